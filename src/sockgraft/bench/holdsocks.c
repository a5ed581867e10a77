/* holdsocks N PORT0: bind N UDP sockets to 0.0.0.0:PORT0+i, print "ready N",
 * then wait until stdin closes. The scale benchmark's container workload:
 * every bind is grafted, so N sockets become N host sockets. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: holdsocks N PORT0\n");
        return 2;
    }
    int n = atoi(argv[1]), port0 = atoi(argv[2]), ok = 0;
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port0 + i)};
        if (s >= 0 && bind(s, (struct sockaddr *)&a, sizeof a) == 0) ok++;
    }
    printf("ready %d\n", ok);
    fflush(stdout);
    char b[64];
    while (read(0, b, sizeof b) > 0) {
    }
    return ok == n ? 0 : 1;
}
