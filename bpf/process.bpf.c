/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Process lifecycle: exec, fork, exit.
 *
 * Only stable ABI: tracepoint arguments, helpers and user memory.  argv is
 * read at sched_process_exec from the new image's user stack, which the ELF
 * ABI lays out before the first instruction runs: argc at the stack pointer,
 * then argv[0..argc-1] and a NULL.  That is the argv /proc/PID/cmdline shows
 * (for a #! script, the interpreter's), and it needs no syscall tracepoint:
 * one of those would put every system call on the host on the slow path.
 */

/* The kernel's own limit on argc (MAX_ARG_STRINGS). */
#define SIDECAR_MAX_ARG_STRINGS 0x7fffffffULL

/* Copy the new image's argv into e->args; sets args_len, args_count, flags. */
static __always_inline void read_argv(struct exec_event *e)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	const char *const *argv;
	u64 sp = 0, argc = 0;
	u32 off = 0;
	int i;

	e->args_len = 0;
	e->args_count = 0;
	e->flags = 0;
	if (!regs || bpf_probe_read_kernel(&sp, sizeof(sp), &PT_REGS_SP(regs)) < 0 ||
	    bpf_probe_read_user(&argc, sizeof(argc), (void *)sp) < 0 ||
	    argc > SIDECAR_MAX_ARG_STRINGS) {
		/* A 32-bit image's stack has 4-byte slots: argc and argv[0] read
		 * together as one number past anything the kernel accepts. */
		e->flags = SIDECAR_EXEC_NO_ARGS;
		return;
	}
	argv = (const char *const *)(sp + sizeof(u64));
	for (i = 0; i < SIDECAR_MAX_ARGS && i < argc; i++) {
		const char *arg = NULL;
		char next;
		u32 more;
		long n;

		if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) < 0 || !arg) {
			e->flags |= SIDECAR_EXEC_NO_ARGS;
			break;
		}
		if (off > SIDECAR_ARGS_LEN - SIDECAR_ARG_MAX) {
			e->flags |= SIDECAR_EXEC_ARGS_TRUNCATED;
			break;
		}
		n = bpf_probe_read_user_str(&e->args[off], SIDECAR_ARG_MAX, arg);
		if (n <= 0) {
			e->flags |= SIDECAR_EXEC_NO_ARGS;
			break;
		}
		/*
		 * Was there more of this argument?  The byte at arg + n - 1 is
		 * the argument's own NUL when the whole of it fit (n < ARG_MAX),
		 * and the first byte left out when the limit cut it.  Asking so,
		 * without a branch on n or on the byte, keeps the verifier to one
		 * path through the loop: a branch there made it walk ~650,000
		 * instructions, over half a second of every start-up.
		 */
		next = 0;
		bpf_probe_read_user(&next, 1, arg + n - 1);
		more = (u8)next;
		asm volatile("" : "+r"(more)); /* the compiler must not turn this into a branch */
		e->flags |= ((more + 255) >> 8) * SIDECAR_EXEC_ARGS_TRUNCATED;
		off += n;
		e->args_count++;
	}
	if (i == SIDECAR_MAX_ARGS && argc > SIDECAR_MAX_ARGS)
		e->flags |= SIDECAR_EXEC_ARGS_TRUNCATED;
	e->args_len = off;
}

/* The thread group id of the caller's parent (real_parent), 0 if unreadable. */
static __always_inline u32 parent_tgid(void)
{
	u64 task = bpf_get_current_task(), parent = 0;
	u32 tgid = 0;

	if (bpf_probe_read_kernel(&parent, sizeof(parent),
				  (void *)(task + SIDECAR_OFF_TASK_REAL_PARENT)) ||
	    !parent)
		return 0;
	bpf_probe_read_kernel(&tgid, sizeof(tgid), (void *)(parent + SIDECAR_OFF_TASK_TGID));
	return tgid;
}

/* Nanoseconds are below 2^30; the bits above may be flags of the kernel's. */
#define SIDECAR_NSEC_MASK 0x3fffffffU

/* The file the new image runs, as the kernel holds it. */
struct exe_file_id {
	u64 ino;
	u64 ctime_sec;
	u32 dev;
	u32 ctime_nsec;
};

/*
 * Read current->mm->exe_file: set by the exec before this tracepoint, it is
 * the file that runs (the interpreter of a #! script), however its path was
 * spelled, mounted or chrooted.  Offsets come from the running kernel's BTF.
 */
static __always_inline int read_exe_file(struct exe_file_id *x)
{
	u64 task = bpf_get_current_task();
	u64 mm = 0, file = 0, inode = 0, sb = 0;

	if (bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + SIDECAR_OFF_TASK_MM)) || !mm)
		return -1;
	if (bpf_probe_read_kernel(&file, sizeof(file), (void *)(mm + SIDECAR_OFF_MM_EXE_FILE)) ||
	    !file)
		return -1;
	if (bpf_probe_read_kernel(&inode, sizeof(inode), (void *)(file + SIDECAR_OFF_FILE_INODE)) ||
	    !inode)
		return -1;
	if (bpf_probe_read_kernel(&sb, sizeof(sb), (void *)(inode + SIDECAR_OFF_INODE_SB)) || !sb)
		return -1;
	if (bpf_probe_read_kernel(&x->ino, sizeof(x->ino), (void *)(inode + SIDECAR_OFF_INODE_INO)) ||
	    bpf_probe_read_kernel(&x->dev, sizeof(x->dev), (void *)(sb + SIDECAR_OFF_SB_DEV)) ||
	    bpf_probe_read_kernel(&x->ctime_sec, sizeof(x->ctime_sec),
				  (void *)(inode + SIDECAR_OFF_INODE_CTIME_SEC)) ||
	    bpf_probe_read_kernel(&x->ctime_nsec, sizeof(x->ctime_nsec),
				  (void *)(inode + SIDECAR_OFF_INODE_CTIME_NSEC)))
		return -1;
	/* Multigrain timestamps (6.13+) keep a "queried" flag in the top bit. */
	x->ctime_nsec &= SIDECAR_NSEC_MASK;
	return 0;
}

/*
 * The effective capabilities of the calling task, as they count on the
 * host: capabilities held inside a user namespace of its own (level > 0)
 * reach nothing outside it, and count as none.
 */
static __always_inline u64 host_caps(void)
{
	u64 task = bpf_get_current_task();
	u64 cred = 0, ns = 0, caps = 0;
	u32 level = 1;

	if (bpf_probe_read_kernel(&cred, sizeof(cred), (void *)(task + SIDECAR_OFF_TASK_CRED)) ||
	    !cred)
		return 0;
	if (bpf_probe_read_kernel(&ns, sizeof(ns), (void *)(cred + SIDECAR_OFF_CRED_USER_NS)) ||
	    !ns || bpf_probe_read_kernel(&level, sizeof(level), (void *)(ns + SIDECAR_OFF_USER_NS_LEVEL)))
		return 0;
	if (level != 0)
		return 0;
	bpf_probe_read_kernel(&caps, sizeof(caps), (void *)(cred + SIDECAR_OFF_CRED_CAP_EFFECTIVE));
	return caps;
}

/*
 * May this identity run the file its new image runs?  Judged by the file
 * (device and inode), not the path: a bind mount, a chroot, a rename or a
 * link cannot put another file behind an allowed name.  An allowed file
 * whose change time moved since the policy was loaded (written in place,
 * chmod'ed, linked) is refused until a reload trusts it again.
 */
static __always_inline u8 judge_exec(u32 identity, const struct exe_file_id *x, int x_read,
				     u64 caps, u32 *gen_out, u32 *flags, u64 *refused)
{
	u32 zero = 0, ruled, gen;
	struct settings *s = settings.lookup(&zero);
	struct identity_policy *p;
	struct exec_key k = {};
	struct exec_file *allowed;
	u8 deny;

	*gen_out = 0;
	if (!s || !(READ_ONCE(s->flags) & SIDECAR_SETTING_POLICY))
		return SIDECAR_VERDICT_ALLOW;
	if (identity == SIDECAR_IDENTITY_NONE || identity == SIDECAR_IDENTITY_PENDING)
		return SIDECAR_VERDICT_ALLOW;
	gen = READ_ONCE(s->policy_gen); /* once: the daemon flips it in place */
	*gen_out = gen;
	p = policy_for(gen, identity, &ruled);
	if (!p)
		return SIDECAR_VERDICT_ALLOW;
	deny = (p->flags & SIDECAR_POLICY_ENFORCE) ? SIDECAR_VERDICT_DENY
						   : SIDECAR_VERDICT_WOULD_DENY;
	/* A capability that could switch enforcement off or reach around it
	 * (CAP_SYS_ADMIN, CAP_BPF, ...) is refused unless the policy accepts it. */
	if (p->caps_refused) {
		*refused = caps & p->caps_refused;
		if (*refused) {
			*flags |= SIDECAR_EXEC_PRIVILEGED;
			return deny;
		}
	}
	if (!(p->flags & SIDECAR_POLICY_EXEC_RESTRICTED))
		return SIDECAR_VERDICT_ALLOW;
	if (!x_read)
		return deny; /* fail closed: a restricted identity runs only what is known */
	k.gen = gen;
	k.identity = ruled;
	k.dev = x->dev;
	k.ino = x->ino;
	allowed = exec_allow.lookup(&k);
	if (!allowed)
		return deny;
	if (allowed->ctime_sec != x->ctime_sec || allowed->ctime_nsec != x->ctime_nsec) {
		*flags |= SIDECAR_EXEC_FILE_CHANGED;
		return deny;
	}
	return SIDECAR_VERDICT_ALLOW;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u64 id = bpf_get_current_pid_tgid(), mm = 0;
	u32 pid = id >> 32;
	u32 old_pid = args->old_pid;
	struct proc_state fresh = {};
	struct proc_state *st;
	struct exec_event *e;
	unsigned short loc = args->data_loc_filename & 0xffff;
	u32 gen, len, size, zero = 0, flags = 0;
	u64 refused = 0, caps, start_ns = 0;
	struct exe_file_id x = {};
	int untracked = 0, x_read;
	u8 verdict;

	/* Each exec makes a new mm: it tells this exec from the task's others. */
	bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(bpf_get_current_task() + SIDECAR_OFF_TASK_MM));
	if (handled_elsewhere(SIDECAR_EVENT_EXEC, id, mm))
		return 0;
	/* A process that holds an identity is judged wherever it runs; the
	 * scope only decides which new processes are attested. */
	st = procs.lookup(&pid);
	if (!st) {
		/* Not recorded when it was made: it was out of scope then, or the
		 * map was full.  A child of a process with an identity carries it. */
		struct proc_state *pst;

		fresh.ppid = parent_tgid();
		pst = fresh.ppid ? procs.lookup(&fresh.ppid) : NULL;
		if (pst && pst->identity != SIDECAR_IDENTITY_NONE)
			fresh.identity = pst->identity;
		else if (!in_scope())
			return 0;
		procs.update(&pid, &fresh);
		st = procs.lookup(&pid);
		if (!st) {
			/* The map is full.  Counted; an unidentified process runs on
			 * untracked, but one that holds an identity may not run where
			 * nothing could judge it: killed before its first instruction. */
			count_lost(SIDECAR_EVENT_EXEC);
			if (fresh.identity == SIDECAR_IDENTITY_NONE)
				return 0;
			bpf_send_signal(SIDECAR_SIGKILL);
			untracked = 1;
			st = &fresh;
		}
	}
	/* A new image must be attested unless it carries an identity inherited
	 * from an attested ancestor: until then it is pending (while a daemon
	 * is alive to attest it).  Out of scope, nothing new is attested. */
	if (st->identity == SIDECAR_IDENTITY_NONE && attesting() && in_scope())
		st->identity = SIDECAR_IDENTITY_PENDING;

	/* Read once, for the verdict and for the record (attestation uses them). */
	x_read = read_exe_file(&x) == 0;
	if (!x_read) {
		x.dev = 0;
		x.ino = 0;
		flags |= SIDECAR_EXEC_FILE_UNKNOWN;
	}
	caps = host_caps();
	bpf_probe_read_kernel(&start_ns, sizeof(start_ns),
			      (void *)(bpf_get_current_task() + SIDECAR_OFF_TASK_START_BOOTTIME));
	st->start_ns = start_ns;

	verdict = judge_exec(st->identity, &x, x_read, caps, &gen, &flags, &refused);
	if (untracked) {
		verdict = SIDECAR_VERDICT_DENY; /* killed above */
		flags |= SIDECAR_EXEC_UNTRACKED;
	} else if (verdict == SIDECAR_VERDICT_DENY) {
		/* Delivered before the new image runs its first instruction. */
		bpf_send_signal(SIDECAR_SIGKILL);
	}

	e = exec_scratch.lookup(&zero);
	if (!e)
		return 0;
	fill_task(&e->task, st);
	e->old_pid = old_pid;
	e->policy_gen = gen;
	e->verdict = verdict;
	e->pad = 0;
	e->exe_dev = x.dev;
	e->exe_ino = x.ino;
	e->caps_refused = refused;
	e->caps_host = caps;
	e->start_ns = start_ns;
	e->filename_len = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename),
						    (void *)args + loc);
	read_argv(e);
	e->flags |= flags;
	len = e->args_len;
	if (len > SIDECAR_ARGS_LEN)
		len = SIDECAR_ARGS_LEN;
	/* Only the argv actually read goes out: most execs use a small part of it. */
	size = __builtin_offsetof(struct exec_event, args) + len;
	fill_header(&e->hdr, SIDECAR_EVENT_EXEC, size);
	/* A pending image is waiting for the daemon: wake it now. */
	if (events.ringbuf_output(e, size,
				  st->identity == SIDECAR_IDENTITY_PENDING ? SIDECAR_RB_FORCE_WAKEUP
									   : SIDECAR_RB_NO_WAKEUP))
		count_lost(SIDECAR_EVENT_EXEC);
	return 0;
}

/*
 * A new process.  task_newtask runs in copy_process once the child exists
 * and before it runs, for every way a task is made (fork, vfork, clone,
 * clone3); threads, io_uring workers and other kernel-made threads carry
 * CLONE_THREAD and share their process's entry, so they write nothing.
 */
TRACEPOINT_PROBE(task, task_newtask)
{
	u32 parent = bpf_get_current_pid_tgid() >> 32;
	u32 child = args->pid;
	u64 clone_flags = args->clone_flags;
	struct proc_state *pst;
	struct proc_state cst = {};
	struct fork_event *e;
	int scoped;

	if (clone_flags & SIDECAR_CLONE_THREAD)
		return 0;
	if (handled_elsewhere(SIDECAR_EVENT_FORK, bpf_get_current_pid_tgid(), child))
		return 0;
	pst = procs.lookup(&parent);
	scoped = in_scope();
	if (!pst && !scoped) {
		/* No identity to carry.  An entry left under this pid (a daemon write
		 * that landed after its process exited) must not become the
		 * identity of whoever reuses the pid: remove it. */
		procs.delete(&child);
		return 0;
	}
	/* The child carries its parent's identity from its first instruction. */
	cst.identity = pst ? pst->identity : SIDECAR_IDENTITY_NONE;
	cst.ppid = parent;
	if (procs.update(&child, &cst)) {
		/* The map is full: the child runs without an entry.  Counted and
		 * reported; its exec in scope is marked pending again. */
		count_lost(SIDECAR_EVENT_FORK);
		return 0;
	}
	/* A vfork child (posix_spawn, most launchers) runs nothing of its own
	 * before it execs or exits, and those records name its parent: a fork
	 * record of its own would only cost the daemon a third more records. */
	if (!scoped || (clone_flags & SIDECAR_CLONE_VFORK))
		return 0;

	e = events.ringbuf_reserve(sizeof(struct fork_event));
	if (!e) {
		count_lost(SIDECAR_EVENT_FORK);
		return 0;
	}
	fill_header(&e->hdr, SIDECAR_EVENT_FORK, sizeof(*e));
	fill_task(&e->task, pst);
	e->child_pid = child;
	e->pad = 0;
	/* A child of a pending parent is pending too, and may not connect until
	 * the daemon gives it the parent's answer: wake the daemon now, as the
	 * pending exec did, rather than let the record wait for its next read. */
	events.ringbuf_submit(e, cst.identity == SIDECAR_IDENTITY_PENDING ? SIDECAR_RB_FORCE_WAKEUP
									   : SIDECAR_RB_NO_WAKEUP);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 pid = id >> 32;
	u32 tid = (u32)id;
	struct proc_state *st;
	struct exit_event *e;

	/* The process ends when its last thread does, whichever thread that is:
	 * a leader that calls pthread_exit leaves the process (and its identity)
	 * running in its other threads. */
#ifdef SIDECAR_HAVE_GROUP_DEAD
	(void)tid;
	if (!args->group_dead)
		return 0;
#else
	if (pid != tid)
		return 0;
#endif
	if (handled_elsewhere(SIDECAR_EVENT_EXIT, id, 0))
		return 0;
	st = procs.lookup(&pid);
	if (!st && !in_scope())
		return 0;

	e = events.ringbuf_reserve(sizeof(struct exit_event));
	if (e) {
		fill_header(&e->hdr, SIDECAR_EVENT_EXIT, sizeof(*e));
		fill_task(&e->task, st);
		events.ringbuf_submit(e, SIDECAR_RB_NO_WAKEUP);
	} else {
		count_lost(SIDECAR_EVENT_EXIT);
	}
	/* After the record is built: the pid may be reused from now on. */
	if (st)
		procs.delete(&pid);
	return 0;
}
