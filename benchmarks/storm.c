// SPDX-License-Identifier: Apache-2.0
// Exec storm: vfork+exec of a program in a loop for a number of seconds,
// then print how many execs completed.  With RATE > 0, paces itself to that
// many execs per second.  Used by bench_pipeline.py and bench_daemon.py.
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>

extern char **environ;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: storm SECONDS PROGRAM [RATE]\n");
		return 2;
	}
	double seconds = atof(argv[1]);
	char *child_argv[] = {argv[2], NULL};
	double rate = argc > 3 ? atof(argv[3]) : 0;
	long n = 0;
	double start = now(), end = start + seconds;

	while (now() < end) {
		if (rate > 0) {
			double due = start + n / rate;
			double wait = due - now();
			if (wait > 0) {
				struct timespec ts = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
				nanosleep(&ts, NULL);
			}
		}
		pid_t pid;
		int status;
		/* posix_spawn uses vfork semantics (CLONE_VM|CLONE_VFORK) in glibc. */
		if (posix_spawn(&pid, argv[2], NULL, NULL, child_argv, environ) != 0)
			return 1;
		if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
			return 1;
		n++;
	}
	printf("%ld\n", n);
	return 0;
}
