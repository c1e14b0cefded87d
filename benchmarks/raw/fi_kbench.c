/*
 * fi_kbench: raw libfabric baseline for aiote's multi-NIC benchmark (issue 5).
 *
 *   fi_kbench PROVIDER K SIZE ITERS [INFLIGHT] [DC] [THREADS]
 *
 * "K NICs" on one host: each process opens K independent fabric + domain +
 * endpoint + CQ + AV sets of PROVIDER (the approach of
 * ../shared/probes/k_domains.c) and registers one SIZE-byte buffer in each.
 * Every logical write of SIZE bytes is striped as aiote stripes it: K shards
 * of (SIZE/K) rounded down to 64 bytes (the last one takes the remainder),
 * shard i on domain i, each with an imm (FI_REMOTE_CQ_DATA) and, with DC=1,
 * FI_DELIVERY_COMPLETE (fi_writemsg), offset 0 -> offset 0 as in fi_bench bw.
 * Each domain keeps INFLIGHT shards in flight (INFLIGHT logical writes).
 *
 *   THREADS 0  one thread per process drives all K domains (as aiote's one
 *              worker per engine does)                              [default]
 *   THREADS 1  one thread per domain on each side (what a worker per NIC
 *              could reach)
 *
 * Forks the target; addresses and keys go over pipes. The target counts the
 * imms of every domain and checks the first and last byte of every shard.
 * Prints one JSON line on stdout ("gbps" counts logical bytes: SIZE * ITERS
 * over the time from the first post to the last completion); everything else
 * goes to stderr.
 *
 * Environment: FI_BENCH_NODE, FI_BENCH_TIMEOUT as for fi_bench.
 * Build: benchmarks/raw/build.sh (or gcc -O2 -pthread -o fi_kbench fi_kbench.c -lfabric).
 */
#define _GNU_SOURCE
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_K 8
#define CQ_BATCH 64
#define PATTERN 0xA5
#define NAME_MAX_LEN 256
#define SHARD_ALIGN 64

static struct {
	const char *prov;
	int k;
	size_t size;
	long iters;
	int inflight;
	int dc;
	int threads;
} O;

/* One "NIC": its own fabric, domain, endpoint, CQ, AV and registration of the buffer. */
struct nic {
	int index;
	struct fi_info *fi;
	struct fid_fabric *fabric;
	struct fid_domain *dom;
	struct fid_ep *ep;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_mr *mr;
	void *desc;
	uint64_t data_mask;
	fi_addr_t peer;
	uint64_t raddr, rkey;
	size_t off, len;          /* this NIC's shard of every write */
	struct fi_context2 *ctx;
	int *free_ctx;
	int nctx, nfree;
	long posted, tx_done, imm_seen;
	unsigned idle;
	pthread_t thread;
};

static struct nic N[MAX_K];
static char *buf;
static size_t buflen;

struct wire_info {
	uint64_t addr;
	uint64_t key;
	uint64_t namelen;
	uint8_t name[NAME_MAX_LEN];
};

struct wire_done {
	int64_t imm_seen[MAX_K];
	double wall, user, sys;   /* the target's CPU time while it waited for the imms */
	int32_t data_ok;
};

static const char *role = "fi_kbench";
static pid_t child_pid;
static int rfd = -1, wfd = -1;
static pthread_barrier_t start_barrier;

static void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fi_kbench[%s]: ", role);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	if (child_pid > 0) {
		kill(child_pid, SIGKILL);
		waitpid(child_pid, NULL, 0);
	}
	exit(1);
}

#define CHK(call)                                                              \
	do {                                                                   \
		long _r = (long)(call);                                        \
		if (_r < 0)                                                    \
			die("%s:%d %s = %ld (%s)", __FILE__, __LINE__, #call,  \
			    _r, fi_strerror((int)-_r));                        \
	} while (0)

static void on_alarm(int sig)
{
	static const char msg[] = "fi_kbench: watchdog expired, giving up\n";
	(void)sig;
	if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) { /* nothing left to do */ }
	if (child_pid > 0) {
		kill(child_pid, SIGKILL);
		waitpid(child_pid, NULL, 0);
	}
	_exit(3);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* CPU seconds of the whole process (all threads) so far. */
static void cpu_times(double *user, double *sys)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	*user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6;
	*sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: fi_kbench PROVIDER K SIZE ITERS [INFLIGHT] [DC] [THREADS]\n"
		"  PROVIDER  e.g. shm, 'tcp;ofi_rxm'\n"
		"  K         domains (\"NICs\") per process, 1..%d; each write is striped over them\n"
		"  SIZE      bytes per logical write, optional K/M/G suffix (binary)\n"
		"  ITERS     logical writes (after INFLIGHT warm-up writes)\n"
		"  INFLIGHT  logical writes in flight (default 32)\n"
		"  DC        1 = FI_DELIVERY_COMPLETE (default 0)\n"
		"  THREADS   0 = one thread drives all domains, 1 = one thread per domain (default 0)\n",
		MAX_K);
	exit(2);
}

static int parse_size(const char *s, size_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-')
		return -1;
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	if (*end)
		return -1;
	*out = (size_t)v;
	return 0;
}

static void parse_args(int argc, char **argv)
{
	if (argc < 5 || argc > 8)
		usage();
	O.prov = argv[1];
	O.k = atoi(argv[2]);
	if (parse_size(argv[3], &O.size))
		usage();
	O.iters = atol(argv[4]);
	O.inflight = argc > 5 ? atoi(argv[5]) : 32;
	O.dc = argc > 6 ? atoi(argv[6]) : 0;
	O.threads = argc > 7 ? atoi(argv[7]) : 0;
	if (O.k < 1 || O.k > MAX_K || O.iters <= 0 || O.inflight <= 0 ||
	    (O.dc != 0 && O.dc != 1) || (O.threads != 0 && O.threads != 1))
		usage();
	if (O.size < (size_t)O.k * SHARD_ALIGN) {
		fprintf(stderr, "fi_kbench: SIZE must be at least K * %d bytes\n", SHARD_ALIGN);
		exit(2);
	}
}

/* ---- pipes -------------------------------------------------------------- */

static void write_all(const void *p, size_t n)
{
	const char *c = p;
	while (n) {
		ssize_t r = write(wfd, c, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			die("pipe write: %s", strerror(errno));
		c += r;
		n -= (size_t)r;
	}
}

static void read_all(void *p, size_t n)
{
	char *c = p;
	while (n) {
		ssize_t r = read(rfd, c, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0)
			die("peer closed the pipe (did it fail?)");
		if (r < 0)
			die("pipe read: %s", strerror(errno));
		c += r;
		n -= (size_t)r;
	}
}

/* ---- libfabric ---------------------------------------------------------- */

/*
 * shm names its region /dev/shm/<pid>:<domain>:<ep> by default.  A process
 * killed with SIGKILL leaves its region behind, and a later process that gets
 * the same pid then fails fi_enable() with -EBUSY (seen on the shared dev VM,
 * where tests kill peers).  Ask for a name of our own instead.
 */
static void shm_unique_name(struct fi_info *hints, int index)
{
	uint32_t r = 0;
	if (strcmp(O.prov, "shm"))
		return;
	if (getrandom(&r, sizeof r, 0) != sizeof r)
		r = (uint32_t)time(NULL);
	char name[64];
	snprintf(name, sizeof name, "fi_shm://fik%d_%08x_%d", (int)getpid(), r, index);
	hints->addr_format = FI_ADDR_STR;
	hints->src_addr = strdup(name);
	hints->src_addrlen = strlen(name) + 1;
}

static void setup(struct nic *n)
{
	struct fi_info *hints = fi_allocinfo();
	if (!hints)
		die("fi_allocinfo failed");
	hints->caps = FI_RMA | FI_MSG | FI_WRITE | FI_REMOTE_WRITE;
	hints->ep_attr->type = FI_EP_RDM;
	hints->fabric_attr->prov_name = strdup(O.prov);
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR |
		FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	hints->domain_attr->threading = FI_THREAD_DOMAIN;
	hints->mode = FI_CONTEXT | FI_CONTEXT2;
	shm_unique_name(hints, n->index);

	const char *node = getenv("FI_BENCH_NODE");
	if (!node)
		node = strcmp(O.prov, "shm") ? "127.0.0.1" : NULL;
	CHK(fi_getinfo(FI_VERSION(1, 17), node, NULL, 0, hints, &n->fi));
	fi_freeinfo(hints);

	size_t cds = n->fi->domain_attr->cq_data_size;
	if (cds == 0)
		die("provider %s has no remote CQ data", O.prov);
	n->data_mask = cds >= 8 ? UINT64_MAX : ((1ULL << (cds * 8)) - 1);
	if (n->fi->domain_attr->mr_mode & FI_MR_RAW)
		die("FI_MR_RAW keys are not supported");

	CHK(fi_fabric(n->fi->fabric_attr, &n->fabric, NULL));
	CHK(fi_domain(n->fabric, n->fi, &n->dom, NULL));
	struct fi_cq_attr cqa = {
		.format = FI_CQ_FORMAT_DATA,
		.size = (size_t)(O.inflight * 2 > 4096 ? O.inflight * 2 : 4096),
	};
	CHK(fi_cq_open(n->dom, &cqa, &n->cq, NULL));
	struct fi_av_attr ava = { .type = FI_AV_TABLE };
	CHK(fi_av_open(n->dom, &ava, &n->av, NULL));
	CHK(fi_endpoint(n->dom, n->fi, &n->ep, NULL));
	CHK(fi_ep_bind(n->ep, &n->cq->fid, FI_TRANSMIT | FI_RECV));
	CHK(fi_ep_bind(n->ep, &n->av->fid, 0));
	CHK(fi_enable(n->ep));
}

static void register_buf(struct nic *n)
{
	uint64_t want_key = 0;
	if (!(n->fi->domain_attr->mr_mode & FI_MR_PROV_KEY)) {
		if (getrandom(&want_key, sizeof want_key, 0) != sizeof want_key)
			die("getrandom: %s", strerror(errno));
		size_t ks = n->fi->domain_attr->mr_key_size;
		if (ks && ks < 8)
			want_key &= (1ULL << (ks * 8)) - 1;
	}
	CHK(fi_mr_reg(n->dom, buf, buflen, FI_WRITE | FI_REMOTE_WRITE, 0,
		      want_key, 0, &n->mr, NULL));
	if (n->fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
		CHK(fi_mr_bind(n->mr, &n->ep->fid, 0));
		CHK(fi_mr_enable(n->mr));
	}
	n->desc = fi_mr_desc(n->mr);
}

static void alloc_ctx(struct nic *n, int cnt)
{
	n->nctx = n->nfree = cnt;
	n->ctx = calloc((size_t)cnt, sizeof *n->ctx);
	n->free_ctx = malloc((size_t)cnt * sizeof *n->free_ctx);
	if (!n->ctx || !n->free_ctx)
		die("out of memory");
	for (int i = 0; i < cnt; i++)
		n->free_ctx[i] = i;
}

static void exchange_info(void)
{
	struct wire_info me[MAX_K], peer[MAX_K];
	memset(me, 0, sizeof me);
	for (int i = 0; i < O.k; i++) {
		size_t nl = sizeof me[i].name;
		CHK(fi_getname(&N[i].ep->fid, me[i].name, &nl));
		me[i].namelen = nl;
		me[i].addr = (uint64_t)(uintptr_t)buf;
		me[i].key = fi_mr_key(N[i].mr);
		if (me[i].key == FI_KEY_NOTAVAIL)
			die("fi_mr_key: key not available");
	}
	write_all(me, sizeof me[0] * (size_t)O.k);
	read_all(peer, sizeof peer[0] * (size_t)O.k);
	for (int i = 0; i < O.k; i++) {
		struct nic *n = &N[i];
		if (peer[i].namelen > sizeof peer[i].name)
			die("bad peer address length");
		if (fi_av_insert(n->av, peer[i].name, 1, &n->peer, 0, NULL) != 1)
			die("fi_av_insert failed (nic %d)", i);
		n->raddr = (n->fi->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? peer[i].addr : 0;
		n->rkey = peer[i].key;
	}
}

static void teardown(void)
{
	for (int i = 0; i < O.k; i++) {
		struct nic *n = &N[i];
		fi_close(&n->ep->fid);
		fi_close(&n->mr->fid);
		fi_close(&n->av->fid);
		fi_close(&n->cq->fid);
		fi_close(&n->dom->fid);
		fi_close(&n->fabric->fid);
		fi_freeinfo(n->fi);
		free(n->ctx);
		free(n->free_ctx);
	}
	free(buf);
}

static void child_check(void)
{
	int st;
	if (child_pid > 0 && waitpid(child_pid, &st, WNOHANG) == child_pid) {
		child_pid = 0;
		die("target exited early (status 0x%x)", st);
	}
}

/* Read one NIC's CQ once: our write completions and peer imms. */
static int progress(struct nic *n)
{
	struct fi_cq_data_entry e[CQ_BATCH];
	ssize_t r = fi_cq_read(n->cq, e, CQ_BATCH);
	if (r == -FI_EAGAIN) {
		/* shm gives no error for a dead peer; only the main thread reaps */
		if ((++n->idle & 0xfffff) == 0 && !O.threads)
			child_check();
		return 0;
	}
	if (r == -FI_EAVAIL) {
		struct fi_cq_err_entry err = { 0 };
		char pbuf[256] = "";
		if (fi_cq_readerr(n->cq, &err, 0) < 0)
			die("fi_cq_readerr failed");
		const char *pe = fi_cq_strerror(n->cq, err.prov_errno, err.err_data,
						pbuf, sizeof pbuf);
		die("nic %d CQ error: %s (err %d, prov_errno %d: %s)", n->index,
		    fi_strerror(err.err), err.err, err.prov_errno, pe ? pe : "");
	}
	if (r < 0)
		die("nic %d fi_cq_read: %s", n->index, fi_strerror((int)-r));
	for (ssize_t i = 0; i < r; i++) {
		struct fi_context2 *c = e[i].op_context;
		if (c >= n->ctx && c < n->ctx + n->nctx) {
			n->free_ctx[n->nfree++] = (int)(c - n->ctx);
			n->tx_done++;
		} else if (e[i].flags & FI_REMOTE_CQ_DATA) {
			n->imm_seen++;
		}
	}
	return (int)r;
}

static void progress_all(void)
{
	for (int i = 0; i < O.k; i++)
		progress(&N[i]);
}

/* Post this NIC's shard of one write: 0 posted, 1 EAGAIN (caller progresses and retries). */
static int try_post(struct nic *n, uint64_t imm)
{
	int slot = n->free_ctx[n->nfree - 1];
	void *ctx = &n->ctx[slot];
	char *src = buf + n->off;
	uint64_t dst = n->raddr + n->off;
	imm &= n->data_mask;
	ssize_t r;
	if (O.dc) {
		struct iovec iov = { .iov_base = src, .iov_len = n->len };
		struct fi_rma_iov riov = { .addr = dst, .len = n->len, .key = n->rkey };
		struct fi_msg_rma msg = {
			.msg_iov = &iov, .desc = &n->desc, .iov_count = 1,
			.addr = n->peer, .rma_iov = &riov, .rma_iov_count = 1,
			.context = ctx, .data = imm,
		};
		r = fi_writemsg(n->ep, &msg, FI_REMOTE_CQ_DATA | FI_COMPLETION | FI_DELIVERY_COMPLETE);
	} else {
		r = fi_writedata(n->ep, src, n->len, n->desc, imm, n->peer, dst, n->rkey, ctx);
	}
	if (r == -FI_EAGAIN)
		return 1;
	if (r)
		die("nic %d post write: %s", n->index, fi_strerror((int)-r));
	n->nfree--;
	n->posted++;
	return 0;
}

/* Keep this NIC's window full until `target` shards are posted; one CQ read per round. */
static void pump(struct nic *n, long target)
{
	while (n->posted < target && n->nfree > 0)
		if (try_post(n, (uint64_t)n->posted))
			break;
	progress(n);
}

static void run_nic_stream(struct nic *n, long target)
{
	while (n->tx_done < target)
		pump(n, target);
}

static void *initiator_thread(void *arg)
{
	struct nic *n = arg;
	long target = n->posted + O.iters;
	pthread_barrier_wait(&start_barrier);
	run_nic_stream(n, target);
	return NULL;
}

/* Returns the timed part's seconds; *cpu_user / *cpu_sys: CPU seconds over it. */
static double run_initiator(double *cpu_user, double *cpu_sys)
{
	long warm = O.inflight < O.iters ? O.inflight : O.iters;
	/* warm-up: connection set-up (first posts get EAGAIN) and faults, on every NIC */
	for (int i = 0; i < O.k; i++)
		run_nic_stream(&N[i], warm);
	double t0, dt, u0, s0;
	cpu_times(&u0, &s0);
	if (O.threads) {
		pthread_barrier_init(&start_barrier, NULL, (unsigned)O.k + 1);
		for (int i = 0; i < O.k; i++)
			if (pthread_create(&N[i].thread, NULL, initiator_thread, &N[i]))
				die("pthread_create: %s", strerror(errno));
		pthread_barrier_wait(&start_barrier);
		t0 = now();
		for (int i = 0; i < O.k; i++)
			pthread_join(N[i].thread, NULL);
		dt = now() - t0;
		pthread_barrier_destroy(&start_barrier);
	} else {
		long target = warm + O.iters;
		t0 = now();
		for (;;) {
			int busy = 0;
			for (int i = 0; i < O.k; i++) {
				if (N[i].tx_done < target) {
					busy = 1;
					pump(&N[i], target);
				}
			}
			if (!busy)
				break;
		}
		dt = now() - t0;
	}
	cpu_times(cpu_user, cpu_sys);
	*cpu_user -= u0;
	*cpu_sys -= s0;
	return dt;
}

static long expect_per_nic(void)
{
	return (O.inflight < O.iters ? O.inflight : O.iters) + O.iters;
}

static void *target_thread(void *arg)
{
	struct nic *n = arg;
	long expect = expect_per_nic();
	while (n->imm_seen < expect)
		progress(n);
	return NULL;
}

static void read_progress(void *p, size_t cnt)
{
	struct pollfd pfd = { .fd = rfd, .events = POLLIN };
	while (poll(&pfd, 1, 0) == 0)
		progress_all();
	read_all(p, cnt);
}

static int check_data(void)
{
	for (int i = 0; i < O.k; i++) {
		const struct nic *n = &N[i];
		if ((uint8_t)buf[n->off] != PATTERN || (uint8_t)buf[n->off + n->len - 1] != PATTERN)
			return 0;
	}
	return 1;
}

static void target_main(void)
{
	long expect = expect_per_nic();
	double w0 = now(), u0, s0;
	cpu_times(&u0, &s0);
	if (O.threads) {
		for (int i = 0; i < O.k; i++)
			if (pthread_create(&N[i].thread, NULL, target_thread, &N[i]))
				die("pthread_create: %s", strerror(errno));
		for (int i = 0; i < O.k; i++)
			pthread_join(N[i].thread, NULL);
	} else {
		for (;;) {
			int busy = 0;
			for (int i = 0; i < O.k; i++) {
				if (N[i].imm_seen < expect) {
					busy = 1;
					progress(&N[i]);
				}
			}
			if (!busy)
				break;
		}
	}
	struct wire_done d = { .data_ok = check_data() };
	cpu_times(&d.user, &d.sys);
	d.user -= u0;
	d.sys -= s0;
	d.wall = now() - w0;
	for (int i = 0; i < O.k; i++)
		d.imm_seen[i] = N[i].imm_seen;
	write_all(&d, sizeof d);
	char bye;
	read_progress(&bye, 1);
}

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			putchar('\\');
		if ((unsigned char)*s >= 0x20)
			putchar(*s);
	}
	putchar('"');
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);

	int p2c[2], c2p[2];
	if (pipe(p2c) || pipe(c2p))
		die("pipe: %s", strerror(errno));
	fflush(NULL);
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	int is_target = pid == 0;
	if (is_target) {
		role = "target";
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(1);
		rfd = p2c[0];
		wfd = c2p[1];
		close(p2c[1]);
		close(c2p[0]);
	} else {
		role = "initiator";
		child_pid = pid;
		rfd = c2p[0];
		wfd = p2c[1];
		close(c2p[1]);
		close(p2c[0]);
	}

	const char *to = getenv("FI_BENCH_TIMEOUT");
	unsigned timeout = to ? (unsigned)atoi(to) : 60;
	signal(SIGALRM, on_alarm);
	alarm(timeout);

	/* libfabric is only touched after fork(): providers are not fork-safe. */
	buflen = O.size;
	size_t alloc = (buflen + 4095) & ~(size_t)4095;
	if (posix_memalign((void **)&buf, 4096, alloc))
		die("cannot allocate %zu bytes", alloc);
	memset(buf, is_target ? 0 : PATTERN, alloc);
	size_t chunk = (O.size / (size_t)O.k) & ~(size_t)(SHARD_ALIGN - 1);
	for (int i = 0; i < O.k; i++) {
		struct nic *n = &N[i];
		n->index = i;
		setup(n);
		register_buf(n);
		alloc_ctx(n, O.inflight);
		n->off = (size_t)i * chunk;
		n->len = i + 1 == O.k ? O.size - n->off : chunk;
	}
	exchange_info();

	if (is_target) {
		target_main();
		teardown();
		return 0;
	}

	double cu, cs;
	double dt = run_initiator(&cu, &cs);

	struct wire_done d;
	read_progress(&d, sizeof d);
	long expect = expect_per_nic();
	for (int i = 0; i < O.k; i++)
		if (d.imm_seen[i] != expect)
			die("target saw %" PRId64 " imms on nic %d, expected %ld", d.imm_seen[i], i, expect);
	if (!d.data_ok)
		die("target buffer does not hold the written data");
	char bye = 1;
	write_all(&bye, 1);
	int st;
	pid_t w = waitpid(child_pid, &st, 0);
	child_pid = 0;
	if (w < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
		die("target failed (status 0x%x)", st);
	alarm(0);

	printf("{\"provider\":");
	json_str(O.prov);
	printf(",\"mode\":\"kbw\",\"k\":%d,\"threads\":%d,\"size\":%zu,\"iters\":%ld,"
	       "\"inflight\":%d,\"dc\":%d,\"seconds\":%.6f,\"gbps\":%.3f,\"ops_per_s\":%.1f,\"nic_bytes\":[",
	       O.k, O.threads, O.size, O.iters, O.inflight, O.dc, dt,
	       O.size * (double)O.iters / dt / 1e9, O.iters / dt);
	for (int i = 0; i < O.k; i++)
		printf("%s%" PRIu64, i ? "," : "", (uint64_t)N[i].len * (uint64_t)(N[i].posted));
	/* CPU busy share (cores) and its system part: initiator over the timed part,
	 * target from its first poll (warm-up included) to the last imm */
	printf("],\"initiator_cpu\":%.3f,\"initiator_sys\":%.3f,\"target_cpu\":%.3f,\"target_sys\":%.3f}\n",
	       (cu + cs) / dt, cs / dt,
	       d.wall > 0 ? (d.user + d.sys) / d.wall : 0.0, d.wall > 0 ? d.sys / d.wall : 0.0);
	teardown();
	return fflush(stdout) ? 1 : 0;
}
