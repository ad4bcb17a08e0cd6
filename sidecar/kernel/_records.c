/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Decodes ring-buffer records into the daemon's record objects, in C.
 *
 * In an exec storm every exec makes two records, and decoding them in
 * Python (struct.unpack, then slicing and decoding the name and arguments)
 * was a sixth of the daemon's CPU.  This decoder reads the records through
 * the contract header itself (bpf/include/events.h), so it cannot disagree
 * with the kernel's layout, and builds the very objects Python's decoder
 * builds (sidecar.kernel.abi.Task, Exec, ...), by calling their classes.
 *
 * It decodes only what it can decode exactly as abi.decode() would.  A
 * record it refuses (too short, another ABI version, an unknown type, an
 * unknown verdict or hook) is reported by index, and the caller hands it to
 * abi.decode(), which raises DecodeError with the reason.  The two decoders
 * are compared record by record in tests/unit/test_abi_decode.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "events.h"

typedef struct {
	PyObject_HEAD
	PyObject *task, *exec, *fork, *exit, *connect, *socket, *unix_;
	PyObject *verdicts, *hooks; /* tuples: member by value, None where none */
	PyObject *address;          /* address(16 bytes, family) -> ip address object */
} Decoder;

#define HEAD_TASK (sizeof(struct event_header) + sizeof(struct task_ctx))
#define EXEC_ARGS offsetof(struct exec_event, args)

static PyObject *text(const char *s, Py_ssize_t n)
{
	return PyUnicode_DecodeUTF8(s, n, "surrogateescape");
}

/* The member of an enum table, new reference; NULL without an error if there is none. */
static PyObject *member(PyObject *table, unsigned int value)
{
	PyObject *m;
	if ((Py_ssize_t)value >= PyTuple_GET_SIZE(table))
		return NULL;
	m = PyTuple_GET_ITEM(table, value);
	if (m == Py_None)
		return NULL;
	Py_INCREF(m);
	return m;
}

static PyObject *call(PyObject *cls, PyObject **args, size_t n)
{
	PyObject *out = PyObject_Vectorcall(cls, args, n, NULL);
	for (size_t i = 0; i < n; i++)
		Py_XDECREF(args[i]);
	return out;
}

/* Any of the arguments NULL: drop the others and fail. */
static int all_set(PyObject **args, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (!args[i]) {
			for (size_t j = 0; j < n; j++)
				Py_XDECREF(args[j]);
			return 0;
		}
	}
	return 1;
}

static PyObject *make_task(Decoder *d, const struct task_ctx *t)
{
	size_t comm_len = strnlen(t->comm, SIDECAR_COMM_LEN);
	PyObject *args[8] = {
		PyLong_FromUnsignedLong(t->pid),      PyLong_FromUnsignedLong(t->tid),
		PyLong_FromUnsignedLong(t->ppid),     PyLong_FromUnsignedLong(t->uid),
		PyLong_FromUnsignedLong(t->gid),      PyLong_FromUnsignedLong(t->identity),
		PyLong_FromUnsignedLongLong(t->cgroup_id), text(t->comm, (Py_ssize_t)comm_len),
	};
	if (!all_set(args, 8))
		return NULL;
	return call(d->task, args, 8);
}

/* The argument list: args split at NULs, as many as the kernel counted. */
static PyObject *make_argv(const char *args, size_t len, unsigned int count)
{
	PyObject *out, *item;
	size_t start = 0, n = 0;
	PyObject *list = PyList_New(0);
	if (!list)
		return NULL;
	/* bytes.split(b"\0") gives one more piece than there are NULs. */
	for (size_t i = 0; i <= len && n < count; i++) {
		if (i < len && args[i] != '\0')
			continue;
		item = text(args + start, (Py_ssize_t)(i - start));
		if (!item || PyList_Append(list, item) < 0) {
			Py_XDECREF(item);
			Py_DECREF(list);
			return NULL;
		}
		Py_DECREF(item);
		n++;
		start = i + 1;
	}
	out = PyList_AsTuple(list);
	Py_DECREF(list);
	return out;
}

/*
 * Each decode_KIND() takes the references to ts and task.  NULL with no error
 * set: refused (the caller's abi.decode() says why).
 */
static PyObject *decode_exec(Decoder *d, const char *data, size_t size,
			     PyObject *ts, PyObject *task)
{
	struct exec_event e;
	size_t name_len, args_len;
	PyObject *verdict;
	memcpy(&e, data, EXEC_ARGS); /* fixed part and file name; args read in place */
	verdict = member(d->verdicts, e.verdict);
	if (!verdict) {
		Py_DECREF(ts);
		Py_DECREF(task);
		return NULL;
	}
	name_len = e.filename_len > 0 && e.filename_len <= SIDECAR_FILENAME_LEN ? e.filename_len - 1u : 0;
	args_len = e.args_len;
	if (args_len > SIDECAR_ARGS_LEN)
		args_len = SIDECAR_ARGS_LEN;
	if (args_len > size - EXEC_ARGS)
		args_len = size - EXEC_ARGS;
	PyObject *args[14] = {
		ts,
		task,
		PyLong_FromUnsignedLong(e.policy_gen),
		text(e.filename, (Py_ssize_t)name_len),
		make_argv(data + EXEC_ARGS, args_len, e.args_count),
		PyBool_FromLong(e.flags & SIDECAR_EXEC_ARGS_TRUNCATED),
		PyBool_FromLong(e.flags & SIDECAR_EXEC_NO_ARGS),
		verdict,
		PyLong_FromUnsignedLong(e.flags),
		PyLong_FromUnsignedLongLong(e.caps_refused),
		PyLong_FromUnsignedLongLong(e.caps_host),
		PyLong_FromUnsignedLongLong(e.start_ns),
		PyLong_FromUnsignedLong(e.exe_dev),
		PyLong_FromUnsignedLongLong(e.exe_ino),
	};
	if (!all_set(args, 14))
		return NULL;
	return call(d->exec, args, 14);
}

static PyObject *decode_connect(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct connect_event e;
	PyObject *hook, *verdict, *raw, *family, *address;
	memcpy(&e, data, sizeof(e));
	hook = member(d->hooks, e.hook);
	verdict = member(d->verdicts, e.verdict);
	if (!hook || !verdict) {
		Py_XDECREF(hook);
		Py_XDECREF(verdict);
		Py_DECREF(ts);
		Py_DECREF(task);
		return NULL;
	}
	raw = PyBytes_FromStringAndSize((const char *)e.daddr, SIDECAR_ADDR_LEN);
	family = PyLong_FromUnsignedLong(e.family);
	address = raw && family ? PyObject_CallFunctionObjArgs(d->address, raw, family, NULL) : NULL;
	Py_XDECREF(raw);
	PyObject *args[10] = {
		ts,
		task,
		family,
		PyLong_FromUnsignedLong(e.protocol),
		hook,
		verdict,
		address,
		PyLong_FromUnsignedLong(e.dport),
		PyLong_FromUnsignedLong(e.rule),
		PyLong_FromUnsignedLong(e.policy_gen),
	};
	if (!all_set(args, 10))
		return NULL;
	return call(d->connect, args, 10);
}

static PyObject *decode_socket(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct socket_event e;
	PyObject *hook, *verdict;
	memcpy(&e, data, sizeof(e));
	hook = member(d->hooks, e.hook);
	verdict = member(d->verdicts, e.verdict);
	if (!hook || !verdict) {
		Py_XDECREF(hook);
		Py_XDECREF(verdict);
		Py_DECREF(ts);
		Py_DECREF(task);
		return NULL;
	}
	PyObject *args[10] = {
		ts,
		task,
		PyLong_FromUnsignedLong(e.family),
		PyLong_FromUnsignedLong(e.type),
		PyLong_FromUnsignedLong(e.protocol),
		hook,
		verdict,
		PyLong_FromLong(e.level),
		PyLong_FromLong(e.optname),
		PyLong_FromUnsignedLong(e.policy_gen),
	};
	if (!all_set(args, 10))
		return NULL;
	return call(d->socket, args, 10);
}

static PyObject *decode_unix(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct unix_event e;
	PyObject *hook, *verdict;
	size_t n;
	memcpy(&e, data, sizeof(e));
	hook = member(d->hooks, e.hook);
	verdict = member(d->verdicts, e.verdict);
	if (!hook || !verdict) {
		Py_XDECREF(hook);
		Py_XDECREF(verdict);
		Py_DECREF(ts);
		Py_DECREF(task);
		return NULL;
	}
	n = e.path_len < SIDECAR_UNIX_PATH_LEN ? e.path_len : SIDECAR_UNIX_PATH_LEN;
	PyObject *args[6] = {
		ts,
		task,
		hook,
		verdict,
		PyBytes_FromStringAndSize(e.path, (Py_ssize_t)n),
		PyLong_FromUnsignedLong(e.policy_gen),
	};
	if (!all_set(args, 6))
		return NULL;
	return call(d->unix_, args, 6);
}

/* The record size its type must have (an exec's is the most it may have); 0: unknown type. */
static size_t expected_size(unsigned int type)
{
	switch (type) {
	case SIDECAR_EVENT_EXEC:
		return sizeof(struct exec_event);
	case SIDECAR_EVENT_FORK:
		return sizeof(struct fork_event);
	case SIDECAR_EVENT_EXIT:
		return sizeof(struct exit_event);
	case SIDECAR_EVENT_CONNECT:
		return sizeof(struct connect_event);
	case SIDECAR_EVENT_SOCKET:
		return sizeof(struct socket_event);
	case SIDECAR_EVENT_UNIX:
		return sizeof(struct unix_event);
	}
	return 0;
}

/* One record: a new reference, or NULL (an error set, or refused without one). */
static PyObject *decode_one(Decoder *d, const char *data, size_t len)
{
	struct event_header h;
	struct task_ctx t;
	size_t want;
	PyObject *ts, *task;
	if (len < HEAD_TASK)
		return NULL;
	memcpy(&h, data, sizeof(h));
	if (h.version != SIDECAR_ABI_VERSION)
		return NULL;
	want = expected_size(h.type);
	if (!want)
		return NULL;
	if (h.type == SIDECAR_EVENT_EXEC) {
		if (h.size < EXEC_ARGS || h.size > want || len < h.size)
			return NULL;
	} else if (len < want || h.size != want) {
		return NULL;
	}
	memcpy(&t, data + sizeof(h), sizeof(t));
	ts = PyLong_FromUnsignedLongLong(h.ts_ns);
	if (!ts)
		return NULL;
	task = make_task(d, &t);
	if (!task) {
		Py_DECREF(ts);
		return NULL;
	}
	switch (h.type) {
	case SIDECAR_EVENT_EXIT: {
		PyObject *args[2] = {ts, task};
		return call(d->exit, args, 2);
	}
	case SIDECAR_EVENT_EXEC:
		return decode_exec(d, data, h.size, ts, task);
	case SIDECAR_EVENT_FORK: {
		struct fork_event e;
		memcpy(&e, data, sizeof(e));
		PyObject *args[3] = {ts, task, PyLong_FromUnsignedLong(e.child_pid)};
		if (!all_set(args, 3))
			return NULL;
		return call(d->fork, args, 3);
	}
	case SIDECAR_EVENT_CONNECT:
		return decode_connect(d, data, ts, task);
	case SIDECAR_EVENT_SOCKET:
		return decode_socket(d, data, ts, task);
	default: /* SIDECAR_EVENT_UNIX: expected_size() knows no other */
		return decode_unix(d, data, ts, task);
	}
}

static PyObject *Decoder_decode(Decoder *d, PyObject *records)
{
	PyObject *out, *refused, *result;
	Py_ssize_t n;
	if (!PyList_Check(records)) {
		PyErr_SetString(PyExc_TypeError, "decode() takes a list of bytes");
		return NULL;
	}
	n = PyList_GET_SIZE(records);
	out = PyList_New(0);
	refused = PyList_New(0);
	if (!out || !refused)
		goto fail;
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *raw = PyList_GET_ITEM(records, i), *ev;
		if (!PyBytes_Check(raw)) {
			PyErr_SetString(PyExc_TypeError, "decode() takes a list of bytes");
			goto fail;
		}
		ev = decode_one(d, PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
		if (ev) {
			int rc = PyList_Append(out, ev);
			Py_DECREF(ev);
			if (rc < 0)
				goto fail;
			continue;
		}
		if (PyErr_Occurred())
			goto fail;
		PyObject *index = PyLong_FromSsize_t(i);
		if (!index || PyList_Append(refused, index) < 0) {
			Py_XDECREF(index);
			goto fail;
		}
		Py_DECREF(index);
	}
	result = PyTuple_Pack(2, out, refused);
	Py_DECREF(out);
	Py_DECREF(refused);
	return result;
fail:
	Py_XDECREF(out);
	Py_XDECREF(refused);
	return NULL;
}

static int Decoder_init(Decoder *d, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"task",  "exec",     "fork",  "exit",    "connect",
				 "socket", "unix",    "verdicts", "hooks", "address", NULL};
	PyObject *o[10];
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOO!O!O", kwlist, &o[0], &o[1], &o[2],
					 &o[3], &o[4], &o[5], &o[6], &PyTuple_Type, &o[7],
					 &PyTuple_Type, &o[8], &o[9]))
		return -1;
	PyObject **slots[10] = {&d->task,   &d->exec,  &d->fork,     &d->exit,  &d->connect,
				&d->socket, &d->unix_, &d->verdicts, &d->hooks, &d->address};
	for (int i = 0; i < 10; i++) {
		Py_INCREF(o[i]);
		Py_XSETREF(*slots[i], o[i]);
	}
	return 0;
}

static int Decoder_traverse(Decoder *d, visitproc visit, void *arg)
{
	Py_VISIT(d->task);
	Py_VISIT(d->exec);
	Py_VISIT(d->fork);
	Py_VISIT(d->exit);
	Py_VISIT(d->connect);
	Py_VISIT(d->socket);
	Py_VISIT(d->unix_);
	Py_VISIT(d->verdicts);
	Py_VISIT(d->hooks);
	Py_VISIT(d->address);
	return 0;
}

static int Decoder_clear(Decoder *d)
{
	Py_CLEAR(d->task);
	Py_CLEAR(d->exec);
	Py_CLEAR(d->fork);
	Py_CLEAR(d->exit);
	Py_CLEAR(d->connect);
	Py_CLEAR(d->socket);
	Py_CLEAR(d->unix_);
	Py_CLEAR(d->verdicts);
	Py_CLEAR(d->hooks);
	Py_CLEAR(d->address);
	return 0;
}

static void Decoder_dealloc(Decoder *d)
{
	PyObject_GC_UnTrack(d);
	Decoder_clear(d);
	Py_TYPE(d)->tp_free((PyObject *)d);
}

static PyMethodDef Decoder_methods[] = {
	{"decode", (PyCFunction)Decoder_decode, METH_O,
	 "decode(records) -> (decoded, refused): the records decoded, in order, and the "
	 "indices of those refused (abi.decode() says why)."},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sidecar.kernel._records.Decoder",
	.tp_basicsize = sizeof(Decoder),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.tp_doc = "Decoder(task, exec, fork, exit, connect, socket, unix, verdicts, hooks, "
		  "address): ring-buffer records to the classes given.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Decoder_init,
	.tp_dealloc = (destructor)Decoder_dealloc,
	.tp_traverse = (traverseproc)Decoder_traverse,
	.tp_clear = (inquiry)Decoder_clear,
	.tp_methods = Decoder_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "sidecar.kernel._records",
	.m_doc = "Ring-buffer records decoded through the contract header.",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__records(void)
{
	PyObject *m;
	if (PyType_Ready(&DecoderType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Decoder", (PyObject *)&DecoderType) < 0 ||
	    PyModule_AddIntConstant(m, "ABI_VERSION", SIDECAR_ABI_VERSION) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
