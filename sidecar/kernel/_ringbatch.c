/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Collects ring-buffer records for the daemon's reader thread.
 *
 * libbpf's ring_buffer__poll() calls a sample callback once per record.  A
 * Python callback costs about 2.5 us a record (ctypes builds its arguments
 * and takes the GIL each time), which under an exec storm was a third of the
 * daemon's CPU.  This callback is plain C: it copies each record into a
 * growing buffer, without the GIL (ctypes releases it around the poll), and
 * RecordBatch.take() hands the whole batch to Python as a list of bytes.
 *
 * The buffer is owned by one reader thread; nothing here is shared.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Past this many bytes a batch stops growing: the callback returns an error,
 * libbpf leaves the record in the ring, and the next poll delivers it. */
#define BATCH_MAX_BYTES (64u << 20)
#define BATCH_FIRST_BYTES (256u << 10)

struct batch {
	unsigned char *buf; /* records, each as a u32 length, then its bytes */
	size_t len;
	size_t cap;
	uint64_t deferred; /* times a record was left in the ring because the batch was full */
};

static int grow(struct batch *b, size_t need)
{
	size_t cap = b->cap ? b->cap : BATCH_FIRST_BYTES;
	unsigned char *buf;

	while (cap < need)
		cap *= 2;
	if (cap > BATCH_MAX_BYTES)
		return -1;
	buf = realloc(b->buf, cap);
	if (!buf)
		return -1;
	b->buf = buf;
	b->cap = cap;
	return 0;
}

/* int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size) */
static int collect(void *ctx, void *data, size_t size)
{
	struct batch *b = ctx;
	size_t need = b->len + sizeof(uint32_t) + size;
	uint32_t len32 = (uint32_t)size;

	if (size > UINT32_MAX)
		return 0; /* cannot happen: a ring record is at most the ring's size */
	if (need > b->cap && grow(b, need) < 0) {
		b->deferred++;
		return -1;
	}
	memcpy(b->buf + b->len, &len32, sizeof(len32));
	memcpy(b->buf + b->len + sizeof(len32), data, size);
	b->len = need;
	return 0;
}

typedef struct {
	PyObject_HEAD
	struct batch b;
} RecordBatch;

static void RecordBatch_dealloc(RecordBatch *self)
{
	free(self->b.buf);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RecordBatch_take(RecordBatch *self, PyObject *Py_UNUSED(ignored))
{
	struct batch *b = &self->b;
	size_t off = 0;
	PyObject *out = PyList_New(0);

	if (!out)
		return NULL;
	while (off + sizeof(uint32_t) <= b->len) {
		uint32_t len32;
		PyObject *rec;

		memcpy(&len32, b->buf + off, sizeof(len32));
		off += sizeof(len32);
		rec = PyBytes_FromStringAndSize((const char *)b->buf + off, len32);
		off += len32;
		if (!rec || PyList_Append(out, rec) < 0) {
			Py_XDECREF(rec);
			Py_DECREF(out);
			return NULL;
		}
		Py_DECREF(rec);
	}
	b->len = 0;
	if (b->cap > BATCH_FIRST_BYTES * 4) {
		/* A burst grew it: give the memory back. */
		free(b->buf);
		b->buf = NULL;
		b->cap = 0;
	}
	return out;
}

static PyObject *RecordBatch_get_ctx(RecordBatch *self, void *Py_UNUSED(closure))
{
	return PyLong_FromVoidPtr(&self->b);
}

static PyObject *RecordBatch_get_deferred(RecordBatch *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(self->b.deferred);
}

static PyMethodDef RecordBatch_methods[] = {
	{"take", (PyCFunction)RecordBatch_take, METH_NOARGS,
	 "Records collected since the last take, oldest first; empties the batch."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef RecordBatch_getset[] = {
	{"ctx", (getter)RecordBatch_get_ctx, NULL,
	 "Address to pass as ring_buffer__new's ctx, with CALLBACK as its sample_cb.", NULL},
	{"deferred", (getter)RecordBatch_get_deferred, NULL,
	 "Records left in the ring for the next poll because the batch was full.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RecordBatchType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sidecar.kernel._ringbatch.RecordBatch",
	.tp_basicsize = sizeof(RecordBatch),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Ring-buffer records gathered by the C sample callback.",
	.tp_new = PyType_GenericNew,
	.tp_dealloc = (destructor)RecordBatch_dealloc,
	.tp_methods = RecordBatch_methods,
	.tp_getset = RecordBatch_getset,
};

static int add_callback(PyObject *m)
{
	PyObject *addr = PyLong_FromVoidPtr((void *)collect);
	int rc;

	if (!addr)
		return -1;
	rc = PyModule_AddObjectRef(m, "CALLBACK", addr);
	Py_DECREF(addr);
	return rc;
}

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "sidecar.kernel._ringbatch",
	.m_doc = "A C sample callback for libbpf's ring buffer, and the batch it fills.",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__ringbatch(void)
{
	PyObject *m;

	if (PyType_Ready(&RecordBatchType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "RecordBatch", (PyObject *)&RecordBatchType) < 0 ||
	    PyModule_AddIntConstant(m, "BATCH_MAX_BYTES", BATCH_MAX_BYTES) < 0 ||
	    add_callback(m) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
