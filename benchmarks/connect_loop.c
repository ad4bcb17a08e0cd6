// SPDX-License-Identifier: Apache-2.0
// connect() latency loops for bench_connect.py.
//   connect_loop udp N PORT   N connect() calls on one UDP socket to 127.0.0.1:PORT
//   connect_loop tcp N PORT   N times: socket, connect to its own listener on PORT,
//                             accept, close both
// Waits for one byte on stdin before starting (so its identity can be set),
// then prints nanoseconds per operation.
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: connect_loop udp|tcp N PORT\n");
		return 2;
	}
	long n = atol(argv[2]);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	int listener = -1;
	char go;

	if (strcmp(argv[1], "tcp") == 0) {
		int one = 1;
		listener = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(listener, (struct sockaddr *)&sa, sizeof(sa)) || listen(listener, 128)) {
			perror("listen");
			return 1;
		}
	}
	printf("ready\n");
	fflush(stdout);
	if (read(0, &go, 1) != 1)
		return 1;

	double t0 = now();
	if (listener < 0) {
		int s = socket(AF_INET, SOCK_DGRAM, 0);
		for (long i = 0; i < n; i++)
			if (connect(s, (struct sockaddr *)&sa, sizeof(sa))) {
				fprintf(stderr, "connect: %s\n", strerror(errno));
				return 1;
			}
		close(s);
	} else {
		for (long i = 0; i < n; i++) {
			int c = socket(AF_INET, SOCK_STREAM, 0);
			if (connect(c, (struct sockaddr *)&sa, sizeof(sa))) {
				fprintf(stderr, "connect: %s\n", strerror(errno));
				return 1;
			}
			int a = accept(listener, NULL, NULL);
			/* The client closes first, so TIME_WAIT sits on its side, not the listener's. */
			struct linger lg = {1, 0};
			setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			close(c);
			close(a);
		}
	}
	printf("%.1f\n", (now() - t0) / n);
	return 0;
}
