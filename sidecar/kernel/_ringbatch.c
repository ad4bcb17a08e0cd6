/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Reads the BPF ring buffer for the daemon's reader thread, and consumes a
 * record only when the caller says its events are written.
 *
 * libbpf's ring_buffer__poll() marks each record consumed as soon as its
 * callback returns.  A daemon killed between that moment and the moment the
 * record's events reach the sink and the spool loses them, and nothing can
 * count them.  This reader keeps its own cursor: read() hands over the
 * records after the cursor and moves it, and only commit(position) moves the
 * kernel's consumer position, which frees the space for the kernel to reuse.
 * What a killed daemon read but had not written is still in the ring when the
 * next daemon opens it, since the ring is pinned.
 *
 * The kernel wakes a waiting reader for a record written at the consumer
 * position (its adaptive wake-up) and for any record submitted with
 * BPF_RB_FORCE_WAKEUP (an exec waiting for attestation).  The ring's fd is
 * registered edge-triggered: while commits lag behind the cursor the ring
 * always polls readable, and only a new wake-up, not the lag, must end a
 * wait.  A lagging reader therefore sleeps until a forced wake-up, or looks
 * again after LAG_WAIT_MS for records that wake nobody.  Commits can then
 * come as late as the caller likes without delaying attestation, so the
 * caller may hand records on in batches.
 *
 * Records come back as a list of bytes, plus the ring position just past each
 * record (packed u64s), so that the caller can tell which records a previous
 * daemon had already written out.  Reading happens without the GIL.
 *
 * One thread reads; commit() may come from any thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

/* Past this many bytes a read stops; the rest waits for the next read. */
#define BATCH_MAX_BYTES (64u << 20)
#define BATCH_FIRST_BYTES (256u << 10)
/* Longest a reader whose commits lag waits before it looks at the ring again. */
#define LAG_WAIT_MS 20

/* The kernel's record header (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c). */
#define RB_BUSY_BIT (1u << 31)
#define RB_DISCARD_BIT (1u << 30)
#define RB_HDR_SZ 8u

typedef struct {
	PyObject_HEAD
	int epfd;
	size_t page;
	size_t size; /* data area, a power of two */
	unsigned long *consumer; /* read-write page shared with the kernel */
	void *producer_map; /* producer page, then the data mapped twice */
	unsigned long cursor; /* just past the last record read() handed over */
	unsigned char *buf; /* records, each as a u32 length then its bytes */
	size_t len, cap;
	uint64_t *ends;
	size_t nends, ends_cap;
} Ring;

static int grow(Ring *r, size_t need)
{
	size_t cap = r->cap ? r->cap : BATCH_FIRST_BYTES;
	unsigned char *buf;

	while (cap < need)
		cap *= 2;
	buf = realloc(r->buf, cap);
	if (!buf)
		return -1;
	r->buf = buf;
	r->cap = cap;
	return 0;
}

static int add_end(Ring *r, uint64_t end)
{
	if (r->nends == r->ends_cap) {
		size_t cap = r->ends_cap ? r->ends_cap * 2 : 1024;
		uint64_t *ends = realloc(r->ends, cap * sizeof(*ends));

		if (!ends)
			return -1;
		r->ends = ends;
		r->ends_cap = cap;
	}
	r->ends[r->nends++] = end;
	return 0;
}

static unsigned long producer_pos(Ring *r)
{
	return __atomic_load_n((unsigned long *)r->producer_map, __ATOMIC_ACQUIRE);
}

static unsigned long consumer_pos(Ring *r)
{
	return __atomic_load_n(r->consumer, __ATOMIC_ACQUIRE);
}

/* Copy the complete records after the cursor; returns 0, or -1 when out of memory. */
static int collect(Ring *r)
{
	unsigned char *data = (unsigned char *)r->producer_map + r->page;
	unsigned long prod = producer_pos(r);
	unsigned long pos = r->cursor;

	while (pos < prod) {
		uint32_t *hdr = (uint32_t *)(data + (pos & (r->size - 1)));
		uint32_t len = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
		uint32_t size;
		unsigned long next;

		if (len & RB_BUSY_BIT)
			break; /* still being written: records after it wait too */
		size = len & ~(RB_BUSY_BIT | RB_DISCARD_BIT);
		next = pos + ((size + RB_HDR_SZ + 7) & ~7u);
		if (!(len & RB_DISCARD_BIT)) {
			size_t need = r->len + sizeof(uint32_t) + size;

			if (need > BATCH_MAX_BYTES && r->len)
				break;
			if (need > r->cap && grow(r, need) < 0)
				return -1;
			if (add_end(r, next) < 0)
				return -1;
			memcpy(r->buf + r->len, &size, sizeof(size));
			memcpy(r->buf + r->len + sizeof(size), (unsigned char *)hdr + RB_HDR_SZ, size);
			r->len = need;
		}
		pos = next;
	}
	r->cursor = pos;
	return 0;
}

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wait_for_records(Ring *r, int timeout_ms)
{
	struct epoll_event ev;
	long long deadline = now_ms() + timeout_ms;
	long long left = timeout_ms;

	while (producer_pos(r) == r->cursor && left > 0) {
		/* Caught up, the kernel's adaptive wake-up comes for the next record;
		 * lagging, only a forced one does, so look again now and then. */
		int wait = consumer_pos(r) == r->cursor || left < LAG_WAIT_MS ? (int)left : LAG_WAIT_MS;

		epoll_wait(r->epfd, &ev, 1, wait);
		left = deadline - now_ms();
	}
}

static PyObject *take(Ring *r)
{
	size_t off = 0;
	PyObject *out = PyList_New(0), *ends = NULL, *result = NULL;

	if (!out)
		return NULL;
	while (off + sizeof(uint32_t) <= r->len) {
		uint32_t len32;
		PyObject *rec;

		memcpy(&len32, r->buf + off, sizeof(len32));
		off += sizeof(len32);
		rec = PyBytes_FromStringAndSize((const char *)r->buf + off, len32);
		off += len32;
		if (!rec || PyList_Append(out, rec) < 0) {
			Py_XDECREF(rec);
			goto out;
		}
		Py_DECREF(rec);
	}
	ends = PyBytes_FromStringAndSize((const char *)r->ends, r->nends * sizeof(uint64_t));
	if (!ends)
		goto out;
	result = Py_BuildValue("(NNk)", out, ends, r->cursor);
	out = ends = NULL;
out:
	Py_XDECREF(out);
	Py_XDECREF(ends);
	r->len = 0;
	r->nends = 0;
	if (r->cap > BATCH_FIRST_BYTES * 4) {
		/* A burst grew it: give the memory back. */
		free(r->buf);
		r->buf = NULL;
		r->cap = 0;
	}
	return result;
}

static PyObject *Ring_read(Ring *r, PyObject *args)
{
	int timeout_ms, rc;

	if (!PyArg_ParseTuple(args, "i", &timeout_ms))
		return NULL;
	if (r->epfd < 0) {
		PyErr_SetString(PyExc_ValueError, "ring is closed");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	wait_for_records(r, timeout_ms);
	rc = collect(r);
	Py_END_ALLOW_THREADS
	if (rc < 0)
		return PyErr_NoMemory();
	return take(r);
}

static PyObject *Ring_commit(Ring *r, PyObject *args)
{
	unsigned long pos, cur;

	if (!PyArg_ParseTuple(args, "k", &pos))
		return NULL;
	if (r->epfd < 0) {
		PyErr_SetString(PyExc_ValueError, "ring is closed");
		return NULL;
	}
	cur = consumer_pos(r);
	/* Only forward: two writers may commit in either order. */
	while (pos > cur) {
		if (__atomic_compare_exchange_n(r->consumer, &cur, pos, 0, __ATOMIC_RELEASE,
						__ATOMIC_ACQUIRE))
			break;
	}
	Py_RETURN_NONE;
}

static void unmap(Ring *r)
{
	if (r->consumer) {
		munmap(r->consumer, r->page);
		r->consumer = NULL;
	}
	if (r->producer_map) {
		munmap(r->producer_map, r->page + 2 * r->size);
		r->producer_map = NULL;
	}
	if (r->epfd >= 0) {
		close(r->epfd);
		r->epfd = -1;
	}
}

static PyObject *Ring_close(Ring *r, PyObject *Py_UNUSED(ignored))
{
	unmap(r);
	Py_RETURN_NONE;
}

static int Ring_init(Ring *r, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"map_fd", "size", NULL};
	int fd;
	unsigned long size;
	struct epoll_event ev = {.events = EPOLLIN | EPOLLET};

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "ik", kwlist, &fd, &size))
		return -1;
	if (size == 0 || (size & (size - 1))) {
		PyErr_Format(PyExc_ValueError, "ring size %lu is not a power of two", size);
		return -1;
	}
	unmap(r);
	r->page = (size_t)sysconf(_SC_PAGESIZE);
	r->size = size;
	r->consumer = mmap(NULL, r->page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (r->consumer == MAP_FAILED) {
		r->consumer = NULL;
		goto fail;
	}
	r->producer_map = mmap(NULL, r->page + 2 * size, PROT_READ, MAP_SHARED, fd, r->page);
	if (r->producer_map == MAP_FAILED) {
		r->producer_map = NULL;
		goto fail;
	}
	r->epfd = epoll_create1(EPOLL_CLOEXEC);
	if (r->epfd < 0 || epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		goto fail;
	r->cursor = consumer_pos(r);
	return 0;
fail:
	PyErr_SetFromErrno(PyExc_OSError);
	unmap(r);
	return -1;
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
	Ring *r = (Ring *)type->tp_alloc(type, 0);

	if (r) {
		r->epfd = -1;
	}
	return (PyObject *)r;
}

static void Ring_dealloc(Ring *r)
{
	unmap(r);
	free(r->buf);
	free(r->ends);
	Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Ring_get_consumer(Ring *r, void *Py_UNUSED(closure))
{
	return r->consumer ? PyLong_FromUnsignedLong(consumer_pos(r)) : PyLong_FromLong(0);
}

static PyObject *Ring_get_producer(Ring *r, void *Py_UNUSED(closure))
{
	return r->producer_map ? PyLong_FromUnsignedLong(producer_pos(r)) : PyLong_FromLong(0);
}

static PyObject *Ring_get_cursor(Ring *r, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLong(r->cursor);
}

static PyMethodDef Ring_methods[] = {
	{"read", (PyCFunction)Ring_read, METH_VARARGS,
	 "read(timeout_ms) -> (records, ends, cursor): wait up to timeout_ms, then take the "
	 "records after the cursor. ends packs, as native u64s, the ring position just past "
	 "each record. Nothing is consumed until commit()."},
	{"commit", (PyCFunction)Ring_commit, METH_VARARGS,
	 "commit(position): the records before position are written out; the kernel may reuse "
	 "their space. Never moves backwards."},
	{"close", (PyCFunction)Ring_close, METH_NOARGS, "Unmap the ring."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
	{"consumer", (getter)Ring_get_consumer, NULL, "The kernel's consumer position.", NULL},
	{"producer", (getter)Ring_get_producer, NULL, "The kernel's producer position.", NULL},
	{"cursor", (getter)Ring_get_cursor, NULL, "Position just past the records read.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sidecar.kernel._ringbatch.Ring",
	.tp_basicsize = sizeof(Ring),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Ring(map_fd, size): a BPF ring buffer read with a cursor, consumed on commit.",
	.tp_new = Ring_new,
	.tp_init = (initproc)Ring_init,
	.tp_dealloc = (destructor)Ring_dealloc,
	.tp_methods = Ring_methods,
	.tp_getset = Ring_getset,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "sidecar.kernel._ringbatch",
	.m_doc = "A BPF ring-buffer reader that consumes records only on commit.",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__ringbatch(void)
{
	PyObject *m;

	if (PyType_Ready(&RingType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0 ||
	    PyModule_AddIntConstant(m, "BATCH_MAX_BYTES", BATCH_MAX_BYTES) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
