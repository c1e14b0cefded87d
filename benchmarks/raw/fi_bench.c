/*
 * fi_bench: raw libfabric baseline for aiote's benchmarks.
 *
 *   fi_bench PROVIDER MODE SIZE ITERS [INFLIGHT] [DC]
 *
 * Forks an initiator (parent) and a target (child) that talk over one RDM
 * endpoint each; addresses and keys go over pipes. Prints one JSON line on
 * stdout; everything else goes to stderr. See usage() for the modes.
 *
 * Environment:
 *   FI_BENCH_NODE     node passed to fi_getinfo (default 127.0.0.1, none for shm)
 *   FI_BENCH_TIMEOUT  watchdog in seconds, 0 = off (default 60)
 *   FI_BENCH_CPUS     "A,B": pin initiator to CPU A, target to CPU B (default: no pinning)
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
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define LAT_WARMUP 100
#define LAT_NCTX 16               /* lat: own writes may complete late; don't stall on them */
#define PAGED_MAX_REGION (64UL << 20)
#define CQ_BATCH 64
#define PATTERN 0xA5
#define NAME_MAX_LEN 256

enum mode { MODE_BW, MODE_LAT, MODE_PAGED };

static struct {
	const char *prov;
	enum mode mode;
	const char *mode_name;
	size_t size;
	long iters;
	int inflight;
	int dc;
} O;

/* One process's libfabric state. Both processes run the same setup after fork(). */
static struct {
	struct fi_info *fi;
	struct fid_fabric *fabric;
	struct fid_domain *dom;
	struct fid_ep *ep;
	struct fid_av *av;
	struct fid_cq *cq;
	struct fid_mr *mr;
	char *buf;
	size_t buflen;
	void *desc;
	uint64_t data_mask;       /* imm must fit cq_data_size */
	fi_addr_t peer;
	uint64_t raddr;           /* base to add offsets to: peer VA or 0 */
	uint64_t rkey;
	struct fi_context2 *ctx;  /* one per write in flight */
	int *free_ctx;
	int nctx, nfree;
	long posted, tx_done, imm_seen;
} F;

/* What each side tells the other over the pipe. Small enough for one atomic write. */
struct wire_info {
	uint64_t addr;
	uint64_t key;
	uint64_t namelen;
	uint8_t name[NAME_MAX_LEN];
};

/* End-of-run report from the target. */
struct wire_done {
	int64_t imm_seen;
	int32_t data_ok;
};

static const char *role = "fi_bench";
static pid_t child_pid;           /* set in the parent only */
static int rfd = -1, wfd = -1;    /* pipe ends: from peer, to peer */

static void die(const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "fi_bench[%s]: ", role);
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

/* Last line of defence against provider hangs (e.g. shm never completing a write). */
static void on_alarm(int sig)
{
	static const char msg[] = "fi_bench: watchdog expired, giving up\n";
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

static void usage(void)
{
	fprintf(stderr,
		"usage: fi_bench PROVIDER MODE SIZE ITERS [INFLIGHT] [DC]\n"
		"  PROVIDER  e.g. shm, 'tcp;ofi_rxm'\n"
		"  MODE      bw    ITERS writes of SIZE bytes with imm, INFLIGHT in flight\n"
		"            lat   ping-pong of SIZE-byte writes with imm (SIZE may be 0);\n"
		"                  p50/p99 of RTT/2 after %d warm-up round trips\n"
		"            paged SIZE-byte pages at random offsets in min(64 MiB, ITERS*SIZE)\n"
		"  SIZE      bytes, optional K/M/G suffix (binary)\n"
		"  INFLIGHT  writes in flight for bw/paged (default 32)\n"
		"  DC        1 = fi_writemsg with FI_DELIVERY_COMPLETE (default 0)\n",
		LAT_WARMUP);
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
	if (argc < 5 || argc > 7)
		usage();
	O.prov = argv[1];
	O.mode_name = argv[2];
	if (!strcmp(argv[2], "bw"))
		O.mode = MODE_BW;
	else if (!strcmp(argv[2], "lat"))
		O.mode = MODE_LAT;
	else if (!strcmp(argv[2], "paged"))
		O.mode = MODE_PAGED;
	else
		usage();
	if (parse_size(argv[3], &O.size))
		usage();
	O.iters = atol(argv[4]);
	O.inflight = argc > 5 ? atoi(argv[5]) : 32;
	O.dc = argc > 6 ? atoi(argv[6]) : 0;
	if (O.iters <= 0 || O.inflight <= 0 || (O.dc != 0 && O.dc != 1))
		usage();
	if (O.size == 0 && O.mode != MODE_LAT) {
		fprintf(stderr, "fi_bench: SIZE 0 is only meaningful for lat\n");
		exit(2);
	}
	/* Verified: the target gets the imm but the initiator never gets a completion. */
	if (O.dc && O.size == 0 && !strcmp(O.prov, "shm")) {
		fprintf(stderr, "fi_bench: shm hangs on 0-byte writes with "
			"FI_DELIVERY_COMPLETE; refusing DC=1 with SIZE 0\n");
		exit(2);
	}
	if (O.mode == MODE_LAT)
		O.inflight = 1;
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
	snprintf(name, sizeof name, "fi_shm://fib%d_%08x_%d", (int)getpid(), r, index);
	hints->addr_format = FI_ADDR_STR;
	hints->src_addr = strdup(name);
	hints->src_addrlen = strlen(name) + 1;
}

static void setup(void)
{
	struct fi_info *hints = fi_allocinfo();
	if (!hints)
		die("fi_allocinfo failed");
	hints->caps = FI_RMA | FI_MSG | FI_WRITE | FI_REMOTE_WRITE;
	hints->ep_attr->type = FI_EP_RDM;
	hints->fabric_attr->prov_name = strdup(O.prov);
	/* Every mr_mode bit we can cope with; the provider keeps the ones it needs. */
	hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR |
		FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	hints->domain_attr->threading = FI_THREAD_DOMAIN;
	/* No FI_RX_CQ_DATA: the imm must arrive without posted receives. */
	hints->mode = FI_CONTEXT | FI_CONTEXT2;
	shm_unique_name(hints, 0);

	const char *node = getenv("FI_BENCH_NODE");
	if (!node)
		node = strcmp(O.prov, "shm") ? "127.0.0.1" : NULL;
	CHK(fi_getinfo(FI_VERSION(1, 17), node, NULL, 0, hints, &F.fi));
	fi_freeinfo(hints);

	size_t cds = F.fi->domain_attr->cq_data_size;
	if (cds == 0)
		die("provider %s has no remote CQ data", O.prov);
	F.data_mask = cds >= 8 ? UINT64_MAX : ((1ULL << (cds * 8)) - 1);
	if (F.fi->domain_attr->mr_mode & FI_MR_RAW)
		die("FI_MR_RAW keys are not supported");

	CHK(fi_fabric(F.fi->fabric_attr, &F.fabric, NULL));
	CHK(fi_domain(F.fabric, F.fi, &F.dom, NULL));
	struct fi_cq_attr cqa = {
		.format = FI_CQ_FORMAT_DATA,
		.size = (size_t)(O.inflight * 2 > 4096 ? O.inflight * 2 : 4096),
	};
	CHK(fi_cq_open(F.dom, &cqa, &F.cq, NULL));
	struct fi_av_attr ava = { .type = FI_AV_TABLE };
	CHK(fi_av_open(F.dom, &ava, &F.av, NULL));
	CHK(fi_endpoint(F.dom, F.fi, &F.ep, NULL));
	CHK(fi_ep_bind(F.ep, &F.cq->fid, FI_TRANSMIT | FI_RECV));
	CHK(fi_ep_bind(F.ep, &F.av->fid, 0));
	CHK(fi_enable(F.ep));
}

/* Register the whole buffer as both write source and write target. */
static void register_buf(void)
{
	uint64_t want_key = 0;
	if (!(F.fi->domain_attr->mr_mode & FI_MR_PROV_KEY)) {
		/* The requested key is the key (tcp, shm): make it unguessable. */
		if (getrandom(&want_key, sizeof want_key, 0) != sizeof want_key)
			die("getrandom: %s", strerror(errno));
		size_t ks = F.fi->domain_attr->mr_key_size;
		if (ks && ks < 8)
			want_key &= (1ULL << (ks * 8)) - 1;
	}
	CHK(fi_mr_reg(F.dom, F.buf, F.buflen, FI_WRITE | FI_REMOTE_WRITE, 0,
		      want_key, 0, &F.mr, NULL));
	if (F.fi->domain_attr->mr_mode & FI_MR_ENDPOINT) {
		CHK(fi_mr_bind(F.mr, &F.ep->fid, 0));
		CHK(fi_mr_enable(F.mr));
	}
	/* Required under FI_MR_LOCAL; harmless (and a hint) otherwise. */
	F.desc = fi_mr_desc(F.mr);
}

static void alloc_ctx(int n)
{
	F.nctx = F.nfree = n;
	F.ctx = calloc((size_t)n, sizeof *F.ctx);
	F.free_ctx = malloc((size_t)n * sizeof *F.free_ctx);
	if (!F.ctx || !F.free_ctx)
		die("out of memory");
	for (int i = 0; i < n; i++)
		F.free_ctx[i] = i;
}

static void exchange_info(void)
{
	struct wire_info me = { 0 }, peer;
	size_t nl = sizeof me.name;
	CHK(fi_getname(&F.ep->fid, me.name, &nl));
	me.namelen = nl;
	me.addr = (uint64_t)(uintptr_t)F.buf;
	me.key = fi_mr_key(F.mr);
	if (me.key == FI_KEY_NOTAVAIL)
		die("fi_mr_key: key not available");
	write_all(&me, sizeof me);
	read_all(&peer, sizeof peer);
	if (peer.namelen > sizeof peer.name)
		die("bad peer address length");
	if (fi_av_insert(F.av, peer.name, 1, &F.peer, 0, NULL) != 1)
		die("fi_av_insert failed");
	/* Without FI_MR_VIRT_ADDR, RMA addresses are offsets into the region. */
	F.raddr = (F.fi->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? peer.addr : 0;
	F.rkey = peer.key;
}

static void teardown(void)
{
	fi_close(&F.ep->fid);
	fi_close(&F.mr->fid);
	fi_close(&F.av->fid);
	fi_close(&F.cq->fid);
	fi_close(&F.dom->fid);
	fi_close(&F.fabric->fid);
	fi_freeinfo(F.fi);
	free(F.ctx);
	free(F.free_ctx);
	free(F.buf);
}

static void child_check(void)
{
	int st;
	if (child_pid > 0 && waitpid(child_pid, &st, WNOHANG) == child_pid) {
		child_pid = 0;
		die("target exited early (status 0x%x)", st);
	}
}

/* Read the CQ once. Sorts entries into our own write completions and peer imms. */
static int progress(void)
{
	static unsigned idle;
	struct fi_cq_data_entry e[CQ_BATCH];
	ssize_t n = fi_cq_read(F.cq, e, CQ_BATCH);
	if (n == -FI_EAGAIN) {
		/* shm gives no error for a dead peer, so look for ourselves. */
		if ((++idle & 0xfffff) == 0)
			child_check();
		return 0;
	}
	if (n == -FI_EAVAIL) {
		struct fi_cq_err_entry err = { 0 };
		char pbuf[256] = "";
		if (fi_cq_readerr(F.cq, &err, 0) < 0)
			die("fi_cq_readerr failed");
		const char *pe = fi_cq_strerror(F.cq, err.prov_errno, err.err_data,
						pbuf, sizeof pbuf);
		die("CQ error: %s (err %d, prov_errno %d: %s) flags=0x%" PRIx64,
		    fi_strerror(err.err), err.err, err.prov_errno, pe ? pe : "",
		    (uint64_t)err.flags);
	}
	if (n < 0)
		die("fi_cq_read: %s", fi_strerror((int)-n));
	for (ssize_t i = 0; i < n; i++) {
		struct fi_context2 *c = e[i].op_context;
		if (c >= F.ctx && c < F.ctx + F.nctx) {
			F.free_ctx[F.nfree++] = (int)(c - F.ctx);
			F.tx_done++;
		} else if (e[i].flags & FI_REMOTE_CQ_DATA) {
			F.imm_seen++;
		} else {
			fprintf(stderr, "fi_bench[%s]: unexpected completion flags=0x%" PRIx64 "\n",
				role, (uint64_t)e[i].flags);
		}
	}
	return (int)n;
}

/* Post one write with imm; on EAGAIN (e.g. first post to a new peer) progress and retry. */
static void post_write(size_t src_off, size_t dst_off, size_t len, uint64_t imm)
{
	while (F.nfree == 0)
		progress();
	int slot = F.free_ctx[--F.nfree];
	void *ctx = &F.ctx[slot];
	char *src = F.buf + src_off;
	uint64_t dst = F.raddr + dst_off;
	imm &= F.data_mask;
	for (;;) {
		ssize_t r;
		if (O.dc) {
			struct iovec iov = { .iov_base = src, .iov_len = len };
			struct fi_rma_iov riov = { .addr = dst, .len = len, .key = F.rkey };
			struct fi_msg_rma msg = {
				.msg_iov = &iov, .desc = &F.desc, .iov_count = 1,
				.addr = F.peer, .rma_iov = &riov, .rma_iov_count = 1,
				.context = ctx, .data = imm,
			};
			r = fi_writemsg(F.ep, &msg, FI_REMOTE_CQ_DATA |
					FI_COMPLETION | FI_DELIVERY_COMPLETE);
		} else {
			r = fi_writedata(F.ep, src, len, F.desc, imm, F.peer, dst,
					 F.rkey, ctx);
		}
		if (r == 0)
			break;
		if (r != -FI_EAGAIN)
			die("post write: %s", fi_strerror((int)-r));
		progress();
	}
	F.posted++;
}

static void drain_tx(void)
{
	while (F.tx_done < F.posted)
		progress();
}

/* Block on the pipe but keep the CQ moving: with manual progress the peer may need us. */
static void read_progress(void *p, size_t n)
{
	struct pollfd pfd = { .fd = rfd, .events = POLLIN };
	while (poll(&pfd, 1, 0) == 0)
		progress();
	read_all(p, n);
}

/* ---- modes -------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

static uint64_t rng(void)
{
	uint64_t x = rng_state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}

static size_t *permutation(size_t n)
{
	size_t *p = malloc(n * sizeof *p);
	if (!p)
		die("out of memory");
	for (size_t i = 0; i < n; i++)
		p[i] = i;
	for (size_t i = n - 1; i > 0; i--) {
		size_t j = rng() % (i + 1), t = p[i];
		p[i] = p[j];
		p[j] = t;
	}
	return p;
}

static size_t paged_region(void)
{
	size_t r = PAGED_MAX_REGION;
	if ((size_t)O.iters < r / O.size)
		r = (size_t)O.iters * O.size;
	r -= r % O.size;
	return r < O.size ? O.size : r;
}

/*
 * Warm-up writes establish the connection (first post returns EAGAIN while it
 * is set up) and fault in provider buffers, so the timed loop measures steady state.
 */
static long bw_warmup(void)
{
	return O.inflight < O.iters ? O.inflight : O.iters;
}

/* bw and paged at the initiator: keep the window full, time first post to last completion. */
static double run_stream(void)
{
	size_t np = 1, *src = NULL, *dst = NULL;
	if (O.mode == MODE_PAGED) {
		np = F.buflen / O.size;
		src = permutation(np);
		dst = permutation(np);
	}
	long warm = bw_warmup();
	for (long i = 0; i < warm; i++)
		post_write(0, 0, O.size, (uint64_t)i);
	drain_tx();

	long base = F.posted, target = F.posted + O.iters;
	double t0 = now();
	while (F.tx_done < target) {
		while (F.posted < target && F.nfree > 0) {
			size_t k = (size_t)(F.posted - base) % np;
			size_t so = src ? src[k] * O.size : 0;
			size_t doff = dst ? dst[k] * O.size : 0;
			post_write(so, doff, O.size, (uint64_t)F.posted);
		}
		progress();
	}
	double dt = now() - t0;
	free(src);
	free(dst);
	return dt;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double percentile(const double *sorted, long n, double p)
{
	long idx = (long)(p * n + 0.999999) - 1;  /* nearest rank */
	if (idx < 0)
		idx = 0;
	if (idx >= n)
		idx = n - 1;
	return sorted[idx];
}

/* lat at the initiator: RTT from post to the peer's imm, busy-polling. */
static void run_ping(double *p50, double *p99)
{
	long total = LAT_WARMUP + O.iters;
	double *us = malloc((size_t)O.iters * sizeof *us);
	if (!us)
		die("out of memory");
	for (long i = 0; i < total; i++) {
		long seen = F.imm_seen;
		double t0 = now();
		post_write(0, 0, O.size, (uint64_t)i);
		while (F.imm_seen == seen)
			progress();
		double t1 = now();
		if (i >= LAT_WARMUP)
			us[i - LAT_WARMUP] = (t1 - t0) * 1e6 / 2;
	}
	drain_tx();
	qsort(us, (size_t)O.iters, sizeof *us, cmp_double);
	*p50 = percentile(us, O.iters, 0.50);
	*p99 = percentile(us, O.iters, 0.99);
	free(us);
}

/* Cheap check that writes landed: first and last byte of every written unit. */
static int check_data(void)
{
	if (O.size == 0)
		return 1;
	size_t unit = O.size, n = F.buflen / unit;  /* paged: every page is written */
	for (size_t i = 0; i < n; i++)
		if ((uint8_t)F.buf[i * unit] != PATTERN ||
		    (uint8_t)F.buf[i * unit + unit - 1] != PATTERN)
			return 0;
	return 1;
}

static void target_main(void)
{
	long expect = O.mode == MODE_LAT ? LAT_WARMUP + O.iters : bw_warmup() + O.iters;
	if (O.mode == MODE_LAT) {
		/* Answer each imm with one of ours. */
		for (long i = 0; i < expect; i++) {
			while (F.imm_seen <= i)
				progress();
			post_write(0, 0, O.size, (uint64_t)i);
		}
		drain_tx();
	} else {
		while (F.imm_seen < expect)
			progress();
	}
	struct wire_done d = { .imm_seen = F.imm_seen, .data_ok = check_data() };
	write_all(&d, sizeof d);
	char bye;
	read_progress(&bye, 1);
}

/* ---- main --------------------------------------------------------------- */

/* Two busy-polling processes: let the caller fix their placement for stable numbers. */
static void pin_cpu(int is_target)
{
	const char *s = getenv("FI_BENCH_CPUS");
	int a, b;
	if (!s || !*s)
		return;
	if (sscanf(s, "%d,%d", &a, &b) != 2)
		die("FI_BENCH_CPUS must be \"A,B\"");
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(is_target ? b : a, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		die("sched_setaffinity: %s", strerror(errno));
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

static void json_num(const char *key, double v, int have, const char *fmt)
{
	printf(",\"%s\":", key);
	if (have && isfinite(v))
		printf(fmt, v);
	else
		fputs("null", stdout);
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
		/* Don't outlive an initiator that died or was killed. */
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

	pin_cpu(is_target);
	const char *to = getenv("FI_BENCH_TIMEOUT");
	unsigned timeout = to ? (unsigned)atoi(to) : 60;
	signal(SIGALRM, on_alarm);
	alarm(timeout);

	/* libfabric is only touched after fork(): providers are not fork-safe. */
	setup();
	if (O.mode == MODE_PAGED)
		F.buflen = paged_region();
	else
		F.buflen = O.size ? O.size : 1;
	size_t alloc = (F.buflen + 4095) & ~(size_t)4095;
	if (posix_memalign((void **)&F.buf, 4096, alloc))
		die("cannot allocate %zu bytes", alloc);
	/* Fault everything in now; the initiator's bytes are what the target checks for. */
	memset(F.buf, is_target ? 0 : PATTERN, alloc);
	register_buf();
	alloc_ctx(O.mode == MODE_LAT ? LAT_NCTX : O.inflight);
	exchange_info();

	if (is_target) {
		target_main();
		teardown();
		return 0;
	}

	double dt = 0, p50 = 0, p99 = 0;
	if (O.mode == MODE_LAT)
		run_ping(&p50, &p99);
	else
		dt = run_stream();

	struct wire_done d;
	read_progress(&d, sizeof d);
	long expect = O.mode == MODE_LAT ? LAT_WARMUP + O.iters : bw_warmup() + O.iters;
	if (d.imm_seen != expect)
		die("target saw %" PRId64 " imms, expected %ld", d.imm_seen, expect);
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
	teardown();

	int is_lat = O.mode == MODE_LAT;
	printf("{\"provider\":");
	json_str(O.prov);
	printf(",\"mode\":\"%s\",\"size\":%zu,\"iters\":%ld,\"inflight\":%d,\"dc\":%d",
	       O.mode_name, O.size, O.iters, O.inflight, O.dc);
	json_num("gbps", O.size * (double)O.iters / dt / 1e9, !is_lat, "%.3f");
	json_num("ops_per_s", O.iters / dt, !is_lat, "%.1f");
	json_num("p50_us", p50, is_lat, "%.3f");
	json_num("p99_us", p99, is_lat, "%.3f");
	printf("}\n");
	return fflush(stdout) ? 1 : 0;
}
