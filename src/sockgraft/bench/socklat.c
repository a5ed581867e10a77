/* socklat N: socket(AF_INET, SOCK_STREAM) + close() N times, each socket()
 * timed as the application sees it. Prints "ready", waits for a line on
 * stdin (so the caller can read the agent's CPU time right before), runs,
 * then prints one JSON line: n, p50_us, p99_us, max_us, total_s, failed.
 * The engine benchmark's socket-mode workload (issue 15). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc != 2 || atoi(argv[1]) <= 0) {
		fprintf(stderr, "usage: socklat N\n");
		return 2;
	}
	int n = atoi(argv[1]), failed = 0;
	double *lat = calloc(n, sizeof(double));
	char line[16];

	if (!lat)
		return 1;
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 1;
	double t0 = now();
	for (int i = 0; i < n; i++) {
		double a = now();
		int s = socket(AF_INET, SOCK_STREAM, 0);
		lat[i] = (now() - a) * 1e6;
		if (s < 0)
			failed++;
		else
			close(s);
	}
	double total = now() - t0;
	qsort(lat, n, sizeof(double), cmp);
	printf("{\"n\": %d, \"p50_us\": %.2f, \"p99_us\": %.2f, \"max_us\": %.2f, "
	       "\"total_s\": %.4f, \"failed\": %d}\n",
	       n, lat[n / 2], lat[(int)(n * 0.99)], lat[n - 1], total, failed);
	fflush(stdout);
	/* stay until the bench has read the agent's CPU time: the session (and
	 * its notifier threads, whose time it reads) ends with this process */
	while (fgets(line, sizeof line, stdin))
		;
	return failed ? 1 : 0;
}
