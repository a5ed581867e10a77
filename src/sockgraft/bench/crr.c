/* crr: connect/request/response/close loop, the connection-rate workload.
 *
 *   crr server PORT                 accept; read 1 byte; write 1 byte; close (forever)
 *   crr client HOST PORT SECONDS    loop connect/send/recv/close; print JSON
 *   crr client-nb HOST PORT SECONDS the same with non-blocking sockets, as an event
 *                                   loop does it (Go, libuv): connect -> EINPROGRESS,
 *                                   poll for writable, SO_ERROR, then poll each step
 *
 * Built by sockgraft's benchmarks with the system C compiler; a plain libc
 * program, so it is grafted exactly like any unmodified application. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int server(int port) {
    int s = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1024)) {
        perror("crr server");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    for (;;) {
        int c = accept(s, NULL, NULL);
        char b;
        if (c < 0) continue;
        if (read(c, &b, 1) == 1) (void)!write(c, &b, 1);
        close(c);
    }
}

/* one connect/send/recv on a non-blocking socket; 0 when it went through */
static int exchange_nb(int s, const struct sockaddr_in *a) {
    struct pollfd p = {.fd = s};
    int err = 0;
    socklen_t len = sizeof err;
    char b = 'x';
    if (connect(s, (const struct sockaddr *)a, sizeof *a) != 0) {
        if (errno != EINPROGRESS) return -1;
        p.events = POLLOUT;
        if (poll(&p, 1, 5000) != 1 || getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) || err)
            return -1;
    }
    if (write(s, &b, 1) != 1) return -1;
    p.events = POLLIN;
    if (poll(&p, 1, 5000) != 1 || read(s, &b, 1) != 1) return -1;
    return 0;
}

static int client(const char *host, int port, double secs, int nonblocking) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    long n = 0, fail = 0;
    double t0, t1 = 0;
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "crr: bad IPv4 address %s\n", host);
        return 2;
    }
    t0 = now();
    do {
        int s = socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
        char b = 'x';
        if (nonblocking ? exchange_nb(s, &a) == 0 :
            connect(s, (struct sockaddr *)&a, sizeof a) == 0 && write(s, &b, 1) == 1 &&
            read(s, &b, 1) == 1)
            n++;
        else
            fail++;
        close(s);
        if (fail > 1000) break;
        t1 = now();
    } while (t1 - t0 < secs);
    printf("{\"conns\": %ld, \"failed\": %ld, \"secs\": %.6f, \"conn_per_s\": %.1f}\n", n, fail,
           t1 - t0, n / (t1 - t0));
    return fail > 1000 ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server")) return server(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "client"))
        return client(argv[2], atoi(argv[3]), atof(argv[4]), 0);
    if (argc == 5 && !strcmp(argv[1], "client-nb"))
        return client(argv[2], atoi(argv[3]), atof(argv[4]), 1);
    fprintf(stderr, "usage: crr server PORT | crr client|client-nb HOST PORT SECONDS\n");
    return 2;
}
