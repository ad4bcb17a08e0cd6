"""Facts about processes and cgroups, read from /proc and /sys/fs/cgroup."""
