// SPDX-License-Identifier: Apache-2.0
// Exec storm: vfork+exec of a program in a loop for a number of seconds,
// then print how many execs completed.  Used by bench_pipeline.py.
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
		fprintf(stderr, "usage: storm SECONDS PROGRAM\n");
		return 2;
	}
	double seconds = atof(argv[1]);
	char *child_argv[] = {argv[2], NULL};
	long n = 0;
	double end = now() + seconds;

	while (now() < end) {
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
