/* The pipe's own floor for bench/run.py: pipeq-sized frames, no pickling, no locks.
 *
 *   floor throughput BODY COUNT PIPE_SIZE [WRITE_SIZE]
 *       A child writes COUNT frames (16-byte header + BODY bytes) into one
 *       pipe, each by one write(), or by writes of at most WRITE_SIZE bytes
 *       (pipeq streams a frame larger than the pipe so); this process reads
 *       each header, then its body.  Prints the seconds from the barrier
 *       release to the last body read.
 *   floor pingpong BODY COUNT PIPE_SIZE
 *       This process sends a frame on one pipe, a child echoes it on a second
 *       pipe.  Prints each round trip in nanoseconds, one a line.
 *
 * Both pipes are resized to PIPE_SIZE bytes (F_SETPIPE_SZ) where the OS can;
 * 0 leaves the default.  Exit status 2 and a message on stderr on any error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { HDR = 16 };

static void die(const char *what)
{
    fprintf(stderr, "floor: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(2);
}

/* At most this many bytes a write(); 0 for no limit. */
static size_t write_size;

static void write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t k = write(fd, p, write_size && n > write_size ? write_size : n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            die("write");
        }
        p += k;
        n -= (size_t)k;
    }
}

static void read_all(int fd, uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t k = read(fd, p, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            die("read");
        }
        if (k == 0) {
            errno = 0;
            die("unexpected end of pipe");
        }
        p += k;
        n -= (size_t)k;
    }
}

static void make_pipe(int fds[2], long size)
{
    if (pipe(fds) != 0)
        die("pipe");
#ifdef F_SETPIPE_SZ
    if (size > 0 && fcntl(fds[1], F_SETPIPE_SZ, (int)size) < 0)
        die("F_SETPIPE_SZ");
#else
    (void)size;
#endif
}

/* pipeq's header layout: "pq", version, flags, n_buffers (u32), body length (u64 LE). */
static uint8_t *make_frame(size_t body)
{
    uint8_t *frame = calloc(HDR + body, 1);
    if (frame == NULL)
        die("calloc");
    memcpy(frame, "pq", 2);
    frame[2] = 1;
    for (int i = 0; i < 8; i++)
        frame[8 + i] = (uint8_t)((uint64_t)body >> (8 * i));
    return frame;
}

/* Read one whole frame into buf (room for `body` bytes); its length must be `body`. */
static void read_frame(int fd, uint8_t *buf, size_t body)
{
    uint8_t hdr[HDR];
    uint64_t length = 0;
    read_all(fd, hdr, HDR);
    for (int i = 0; i < 8; i++)
        length |= (uint64_t)hdr[8 + i] << (8 * i);
    if (memcmp(hdr, "pq", 2) != 0 || length != body) {
        errno = 0;
        die("garbled frame");
    }
    read_all(fd, buf, body);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void reap(pid_t pid)
{
    int status;
    if (waitpid(pid, &status, 0) < 0)
        die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        errno = 0;
        die("child failed");
    }
}

static void throughput(size_t body, long count, long pipe_size)
{
    int data[2], ready[2], go[2];
    uint8_t token = 1;
    make_pipe(data, pipe_size);
    if (pipe(ready) != 0 || pipe(go) != 0)
        die("pipe");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        uint8_t *frame = make_frame(body);
        close(data[0]);
        write_all(ready[1], &token, 1);
        read_all(go[0], &token, 1);
        for (long i = 0; i < count; i++)
            write_all(data[1], frame, HDR + body);
        _exit(0);
    }
    close(data[1]);
    uint8_t *buf = malloc(body > 0 ? body : 1);
    if (buf == NULL)
        die("malloc");
    /* The barrier: the writer is started and waiting before the clock starts. */
    read_all(ready[0], &token, 1);
    int64_t t0 = now_ns();
    write_all(go[1], &token, 1);
    for (long i = 0; i < count; i++)
        read_frame(data[0], buf, body);
    int64_t t1 = now_ns();
    reap(pid);
    printf("%.9f\n", (double)(t1 - t0) / 1e9);
}

static void pingpong(size_t body, long count, long pipe_size)
{
    int ping[2], pong[2];
    make_pipe(ping, pipe_size);
    make_pipe(pong, pipe_size);
    uint8_t *frame = make_frame(body);
    uint8_t *buf = malloc(HDR + body);
    int64_t *samples = malloc(sizeof(int64_t) * (size_t)(count > 0 ? count : 1));
    if (buf == NULL || samples == NULL)
        die("malloc");
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        close(ping[1]);
        close(pong[0]);
        memcpy(buf, frame, HDR);
        for (long i = 0; i < count; i++) {
            read_frame(ping[0], buf + HDR, body);
            write_all(pong[1], buf, HDR + body);
        }
        _exit(0);
    }
    close(ping[0]);
    close(pong[1]);
    for (long i = 0; i < count; i++) {
        int64_t t = now_ns();
        write_all(ping[1], frame, HDR + body);
        read_frame(pong[0], buf, body);
        samples[i] = now_ns() - t;
    }
    reap(pid);
    for (long i = 0; i < count; i++)
        printf("%lld\n", (long long)samples[i]);
}

int main(int argc, char **argv)
{
    if (argc != 5 && !(argc == 6 && strcmp(argv[1], "throughput") == 0)) {
        fprintf(stderr, "usage: floor throughput BODY COUNT PIPE_SIZE [WRITE_SIZE]\n"
                        "       floor pingpong BODY COUNT PIPE_SIZE\n");
        return 2;
    }
    if (argc == 6)
        write_size = (size_t)strtoull(argv[5], NULL, 10);
    size_t body = (size_t)strtoull(argv[2], NULL, 10);
    long count = strtol(argv[3], NULL, 10);
    long pipe_size = strtol(argv[4], NULL, 10);
    if (strcmp(argv[1], "throughput") == 0)
        throughput(body, count, pipe_size);
    else if (strcmp(argv[1], "pingpong") == 0)
        pingpong(body, count, pipe_size);
    else {
        fprintf(stderr, "floor: unknown mode %s\n", argv[1]);
        return 2;
    }
    return fflush(stdout) == 0 ? 0 : 2;
}
