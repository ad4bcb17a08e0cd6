/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Decodes ring-buffer records into the daemon's record objects, in C.
 *
 * In an exec storm every exec makes two records, and decoding them in
 * Python (struct.unpack, then slicing and decoding the name and arguments)
 * was a sixth of the daemon's CPU.  This decoder reads the records through
 * the contract header itself (bpf/include/events.h), so it cannot disagree
 * with the kernel's layout, and builds the very objects Python's decoder
 * builds (sidecar.kernel.abi.Task, Exec, ...).
 *
 * Those are slotted classes whose __init__ only stores its arguments (they
 * are dataclasses with slots and nothing else).  Calling __init__ for the
 * four objects of an exec and its exit cost more than the rest of decoding,
 * so the decoder does what __init__ does: it allocates the object and
 * stores each field in its slot.  The Decoder checks at construction that
 * every class is such a class, with one slot per field the record gives,
 * in order; the comparison with abi.decode() checks the objects are equal.
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
#include <structmember.h>

#include "events.h"

#define FIELDS_MAX 14

/* A slotted class, and where each of its fields lives in its objects. */
typedef struct {
	PyTypeObject *cls;
	Py_ssize_t n;
	Py_ssize_t offset[FIELDS_MAX];
} Maker;

typedef struct {
	PyObject_HEAD
	Maker task, exec, fork, exit, connect, socket, unix_;
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

/* A new object of mk's class with the n fields given, as its __init__ would; takes the references. */
static PyObject *make(Maker *mk, PyObject **args)
{
	PyObject *obj = mk->cls->tp_alloc(mk->cls, 0);
	for (Py_ssize_t i = 0; i < mk->n; i++) {
		if (obj)
			*(PyObject **)((char *)obj + mk->offset[i]) = args[i];
		else
			Py_DECREF(args[i]);
	}
	return obj;
}

/* Learn where cls keeps each of its n fields; -1 with an error if it is not a plain slotted class. */
static int maker_init(Maker *mk, PyObject *cls, Py_ssize_t n)
{
	PyObject *slots;
	PyTypeObject *type;
	if (!PyType_Check(cls)) {
		PyErr_Format(PyExc_TypeError, "%R is not a class", cls);
		return -1;
	}
	type = (PyTypeObject *)cls;
	/* object.__new__ and no instance dict: nothing runs but the slot stores. */
	if (type->tp_new != PyBaseObject_Type.tp_new || type->tp_dictoffset != 0 ||
	    PyObject_HasAttrString(cls, "__post_init__")) {
		PyErr_Format(PyExc_TypeError, "%s is not a plain slotted class", type->tp_name);
		return -1;
	}
	slots = PyObject_GetAttrString(cls, "__slots__");
	if (!slots)
		return -1;
	if (!PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) != n || n > FIELDS_MAX) {
		PyErr_Format(PyExc_TypeError, "%s must have %zd slots, one per field of its record",
			     type->tp_name, n);
		Py_DECREF(slots);
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *descr = PyObject_GetAttr(cls, PyTuple_GET_ITEM(slots, i));
		PyMemberDef *def;
		if (!descr) {
			Py_DECREF(slots);
			return -1;
		}
		if (!Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
		    (def = ((PyMemberDescrObject *)descr)->d_member)->type != T_OBJECT_EX ||
		    (def->flags & READONLY)) {
			PyErr_Format(PyExc_TypeError, "%s.%S is not a writable slot", type->tp_name,
				     PyTuple_GET_ITEM(slots, i));
			Py_DECREF(descr);
			Py_DECREF(slots);
			return -1;
		}
		mk->offset[i] = def->offset;
		Py_DECREF(descr);
	}
	Py_DECREF(slots);
	Py_INCREF(cls);
	Py_XSETREF(mk->cls, type);
	mk->n = n;
	return 0;
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
	return make(&d->task, args);
}

/* The argument list: args split at NULs, as many as the kernel counted. */
static PyObject *make_argv(const char *args, size_t len, unsigned int count)
{
	PyObject *out, *item;
	size_t start = 0, n = 1, i;
	/* bytes.split(b"\0") gives one more piece than there are NULs. */
	for (i = 0; i < len; i++)
		n += args[i] == '\0';
	if (n > count)
		n = count;
	out = PyTuple_New((Py_ssize_t)n);
	if (!out)
		return NULL;
	for (size_t k = 0; k < n; k++) {
		const char *end = memchr(args + start, '\0', len - start);
		size_t stop = end ? (size_t)(end - args) : len;
		item = text(args + start, (Py_ssize_t)(stop - start));
		if (!item) {
			Py_DECREF(out);
			return NULL;
		}
		PyTuple_SET_ITEM(out, (Py_ssize_t)k, item);
		start = stop + 1;
	}
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
	return make(&d->exec, args);
}

/*
 * The members for a record's hook and verdict (new references); 0 if either is
 * unknown, and then the record is refused: ts and task are released.
 */
static int hook_and_verdict(Decoder *d, unsigned int hook_value, unsigned int verdict_value,
			    PyObject **hook, PyObject **verdict, PyObject *ts, PyObject *task)
{
	*hook = member(d->hooks, hook_value);
	*verdict = member(d->verdicts, verdict_value);
	if (*hook && *verdict)
		return 1;
	Py_XDECREF(*hook);
	Py_XDECREF(*verdict);
	Py_DECREF(ts);
	Py_DECREF(task);
	return 0;
}

static PyObject *decode_connect(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct connect_event e;
	PyObject *hook, *verdict, *raw, *family, *address;
	memcpy(&e, data, sizeof(e));
	if (!hook_and_verdict(d, e.hook, e.verdict, &hook, &verdict, ts, task))
		return NULL;
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
	return make(&d->connect, args);
}

static PyObject *decode_socket(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct socket_event e;
	PyObject *hook, *verdict;
	memcpy(&e, data, sizeof(e));
	if (!hook_and_verdict(d, e.hook, e.verdict, &hook, &verdict, ts, task))
		return NULL;
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
	return make(&d->socket, args);
}

static PyObject *decode_unix(Decoder *d, const char *data, PyObject *ts, PyObject *task)
{
	struct unix_event e;
	PyObject *hook, *verdict;
	size_t n;
	memcpy(&e, data, sizeof(e));
	if (!hook_and_verdict(d, e.hook, e.verdict, &hook, &verdict, ts, task))
		return NULL;
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
	return make(&d->unix_, args);
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
		return make(&d->exit, args);
	}
	case SIDECAR_EVENT_EXEC:
		return decode_exec(d, data, h.size, ts, task);
	case SIDECAR_EVENT_FORK: {
		struct fork_event e;
		memcpy(&e, data, sizeof(e));
		PyObject *args[3] = {ts, task, PyLong_FromUnsignedLong(e.child_pid)};
		if (!all_set(args, 3))
			return NULL;
		return make(&d->fork, args);
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
	Maker *makers[7] = {&d->task, &d->exec, &d->fork, &d->exit, &d->connect, &d->socket, &d->unix_};
	/* Fields of each class: abi.Task, Exec, Fork, Exit, Connect, Socket, Unix. */
	static const Py_ssize_t fields[7] = {8, 14, 3, 2, 10, 10, 6};
	for (int i = 0; i < 7; i++) {
		if (maker_init(makers[i], o[i], fields[i]) < 0)
			return -1;
	}
	PyObject **refs[3] = {&d->verdicts, &d->hooks, &d->address};
	for (int i = 0; i < 3; i++) {
		Py_INCREF(o[7 + i]);
		Py_XSETREF(*refs[i], o[7 + i]);
	}
	return 0;
}

static int Decoder_traverse(Decoder *d, visitproc visit, void *arg)
{
	Py_VISIT(d->task.cls);
	Py_VISIT(d->exec.cls);
	Py_VISIT(d->fork.cls);
	Py_VISIT(d->exit.cls);
	Py_VISIT(d->connect.cls);
	Py_VISIT(d->socket.cls);
	Py_VISIT(d->unix_.cls);
	Py_VISIT(d->verdicts);
	Py_VISIT(d->hooks);
	Py_VISIT(d->address);
	return 0;
}

static int Decoder_clear(Decoder *d)
{
	Py_CLEAR(d->task.cls);
	Py_CLEAR(d->exec.cls);
	Py_CLEAR(d->fork.cls);
	Py_CLEAR(d->exit.cls);
	Py_CLEAR(d->connect.cls);
	Py_CLEAR(d->socket.cls);
	Py_CLEAR(d->unix_.cls);
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
