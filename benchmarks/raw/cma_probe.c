/* How fast one or more threads copy into another process with process_vm_writev
 * (the direct shm path's copy; docs/benchmarks.md, "Copy assistants").
 *
 *   gcc -O2 -pthread -o benchmarks/raw/cma_probe benchmarks/raw/cma_probe.c
 *   benchmarks/raw/cma_probe SIZE THREADS THP FORKED
 *
 * SIZE bytes are copied over and over (4 GiB in all) from a huge-page source in
 * this process into a 64 MiB buffer of a child process, THREADS threads each
 * taking its own slice of the range.  THP: 1 = the target buffer asks for
 * transparent huge pages, 0 = 4 KiB pages.  FORKED: 1 = the target buffer is
 * this process's, inherited across fork (its pages turn copy-on-write 4 KiB
 * pages at the first write), 0 = allocated by the child itself. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TOTAL (64ul << 20)

static pid_t child;
static char *src, *dst;
static size_t size;
static int iters, nthreads;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *copier(void *arg)
{
    size_t part = size / (size_t)nthreads, i = (size_t)(long)arg;
    struct iovec l = {src + i * part, part}, r = {dst + i * part, part};
    for (int k = 0; k < iters; k++)
        if (process_vm_writev(child, &l, 1, &r, 1, 0) != (ssize_t)part) {
            perror("process_vm_writev");
            exit(1);
        }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s SIZE THREADS THP FORKED\n", argv[0]);
        return 2;
    }
    size = strtoull(argv[1], NULL, 0);
    nthreads = atoi(argv[2]);
    int thp = atoi(argv[3]), forked = atoi(argv[4]);
    if (!size || size > TOTAL || nthreads < 1 || nthreads > 16)
        return 2;
    src = aligned_alloc(2 << 20, TOTAL);
    madvise(src, TOTAL, MADV_HUGEPAGE);
    memset(src, 2, TOTAL);
    if (forked) {
        dst = aligned_alloc(2 << 20, TOTAL);
        madvise(dst, TOTAL, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        memset(dst, 1, TOTAL);
    }
    int go[2], addr[2];
    if (pipe(go) || pipe(addr))
        return 1;
    child = fork();
    if (!child) {
        char *d = dst, x;
        if (!forked) {
            d = aligned_alloc(2 << 20, TOTAL);
            madvise(d, TOTAL, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
            memset(d, 1, TOTAL);
        }
        if (write(addr[1], &d, sizeof d) != sizeof d || read(go[0], &x, 1) < 0)
            _exit(1);
        _exit(0);
    }
    if (read(addr[0], &dst, sizeof dst) != sizeof dst)
        return 1;
    iters = (int)((4ull << 30) / size);
    pthread_t t[16];
    double t0 = now();
    for (long i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, copier, (void *)i);
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    double dt = now() - t0;
    printf("size %zu threads %d thp %d forked %d: %.2f GB/s\n", size, nthreads, thp, forked,
           (double)iters * (double)size / dt / 1e9);
    if (write(go[1], "x", 1) != 1)
        return 1;
    wait(NULL);
    return 0;
}
