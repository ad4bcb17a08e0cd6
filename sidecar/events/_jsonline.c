/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The object of an event's JSON line, built in C from a plan.
 *
 * sidecar/events/codec.py plans each event kind's JSON line: which field goes
 * under which key, and which are written only when set, as a time, or as
 * "pending".  Its generated Python encoder is the reference; this builds the
 * same dict from the same plan, reading the fields straight from the
 * event's slots, and writes times as RFC 3339 to the nanosecond.  In an exec
 * storm every exec makes two events, and building their dicts in Python was
 * the largest part of writing them.  orjson then serializes the dict, as
 * before.  tests/unit/test_events.py compares the two builders on every kind.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <structmember.h>
#include <time.h>

/* Modes of a plan entry: codec._PLAIN, _OMIT_EMPTY, _TIME, _PENDING. */
enum { PLAIN, OMIT_EMPTY, TIME, PENDING };

#define ENTRIES_MAX 32

typedef struct {
	PyObject_HEAD
	PyTypeObject *cls;
	PyObject *type_name; /* the "type" value */
	Py_ssize_t time_offset; /* slot of time_ns, written first as "time" */
	Py_ssize_t n;
	Py_ssize_t offset[ENTRIES_MAX];
	PyObject *key[ENTRIES_MAX];
	int mode[ENTRIES_MAX];
	/* The text of the last second formatted: events come in time order. */
	long long second;
	char prefix[32];
} Plan;

static PyObject *TYPE_KEY, *TIME_KEY, *PENDING_TEXT;

/* Where cls keeps field `name`; -1 with an error if it is not a plain slot. */
static Py_ssize_t slot_offset(PyTypeObject *cls, PyObject *name)
{
	PyObject *descr = PyObject_GetAttr((PyObject *)cls, name);
	PyMemberDef *def;
	Py_ssize_t off;
	if (!descr)
		return -1;
	if (!Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
	    (def = ((PyMemberDescrObject *)descr)->d_member)->type != T_OBJECT_EX) {
		PyErr_Format(PyExc_TypeError, "%s.%S is not a slot", cls->tp_name, name);
		Py_DECREF(descr);
		return -1;
	}
	off = def->offset;
	Py_DECREF(descr);
	return off;
}

/* RFC 3339 UTC to the nanosecond, as codec.format_time writes it. */
static PyObject *format_time(Plan *p, PyObject *value)
{
	long long ns, second, rest;
	char text[64];
	int overflow = 0;
	ns = PyLong_AsLongLongAndOverflow(value, &overflow);
	if (overflow || (ns == -1 && PyErr_Occurred())) {
		PyErr_Clear();
		return NULL; /* the caller falls back to Python's formatter */
	}
	second = ns / 1000000000LL;
	rest = ns % 1000000000LL;
	if (rest < 0) {
		rest += 1000000000LL;
		second -= 1;
	}
	if (second != p->second || !p->prefix[0]) {
		struct tm tm;
		time_t t = (time_t)second;
		if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 1 || tm.tm_year + 1900 > 9999)
			return NULL;
		snprintf(p->prefix, sizeof(p->prefix), "%04d-%02d-%02dT%02d:%02d:%02d.",
			 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			 tm.tm_sec);
		p->second = second;
	}
	snprintf(text, sizeof(text), "%s%09lld+00:00", p->prefix, rest);
	return PyUnicode_FromString(text);
}

static int Plan_init(Plan *p, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"cls", "type", "entries", NULL};
	PyObject *cls, *type_name, *entries, *time_name;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!UO!", kwlist, &PyType_Type, &cls,
					 &type_name, &PyTuple_Type, &entries))
		return -1;
	if (PyTuple_GET_SIZE(entries) > ENTRIES_MAX) {
		PyErr_SetString(PyExc_ValueError, "too many fields in a plan");
		return -1;
	}
	time_name = PyUnicode_FromString("time_ns");
	if (!time_name)
		return -1;
	p->time_offset = slot_offset((PyTypeObject *)cls, time_name);
	Py_DECREF(time_name);
	if (p->time_offset < 0)
		return -1;
	for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(entries); i++) {
		PyObject *e = PyTuple_GET_ITEM(entries, i), *name, *key;
		int mode;
		if (!PyArg_ParseTuple(e, "UUi", &name, &key, &mode))
			return -1;
		if (mode < PLAIN || mode > PENDING) {
			PyErr_Format(PyExc_ValueError, "unknown mode %d", mode);
			return -1;
		}
		p->offset[i] = slot_offset((PyTypeObject *)cls, name);
		if (p->offset[i] < 0)
			return -1;
		Py_INCREF(key);
		Py_XSETREF(p->key[i], key);
		p->mode[i] = mode;
		p->n = i + 1;
	}
	Py_INCREF(cls);
	Py_XSETREF(p->cls, (PyTypeObject *)cls);
	Py_INCREF(type_name);
	Py_XSETREF(p->type_name, type_name);
	p->prefix[0] = '\0';
	return 0;
}

static PyObject *slot(PyObject *ev, Py_ssize_t offset)
{
	PyObject *v = *(PyObject **)((char *)ev + offset);
	if (!v)
		PyErr_SetString(PyExc_AttributeError, "an event field is not set");
	return v;
}

/* encode(ev) -> the JSON line's object, or None when Python's formatter must write the time. */
static PyObject *Plan_encode(Plan *p, PyObject *ev)
{
	PyObject *out, *v, *when;
	if (!p->cls || Py_TYPE(ev) != p->cls) {
		PyErr_Format(PyExc_TypeError, "not a %s event", p->cls ? p->cls->tp_name : "?");
		return NULL;
	}
	if (!(v = slot(ev, p->time_offset)))
		return NULL;
	when = format_time(p, v);
	if (!when)
		Py_RETURN_NONE;
	out = PyDict_New();
	if (!out || PyDict_SetItem(out, TYPE_KEY, p->type_name) < 0 ||
	    PyDict_SetItem(out, TIME_KEY, when) < 0)
		goto fail;
	Py_CLEAR(when);
	for (Py_ssize_t i = 0; i < p->n; i++) {
		int truth;
		if (!(v = slot(ev, p->offset[i])))
			goto fail;
		switch (p->mode[i]) {
		case PLAIN:
			if (PyDict_SetItem(out, p->key[i], v) < 0)
				goto fail;
			break;
		case OMIT_EMPTY:
		case PENDING:
			truth = PyObject_IsTrue(v);
			if (truth < 0)
				goto fail;
			if (truth &&
			    PyDict_SetItem(out, p->key[i], p->mode[i] == PENDING ? PENDING_TEXT : v) < 0)
				goto fail;
			break;
		default: /* TIME */
			when = format_time(p, v);
			if (!when) {
				Py_DECREF(out);
				Py_RETURN_NONE;
			}
			if (PyDict_SetItem(out, p->key[i], when) < 0)
				goto fail;
			Py_CLEAR(when);
		}
	}
	return out;
fail:
	Py_XDECREF(when);
	Py_XDECREF(out);
	return NULL;
}

static int Plan_traverse(Plan *p, visitproc visit, void *arg)
{
	Py_VISIT(p->cls);
	Py_VISIT(p->type_name);
	for (Py_ssize_t i = 0; i < p->n; i++)
		Py_VISIT(p->key[i]);
	return 0;
}

static int Plan_clear(Plan *p)
{
	Py_CLEAR(p->cls);
	Py_CLEAR(p->type_name);
	for (Py_ssize_t i = 0; i < ENTRIES_MAX; i++)
		Py_CLEAR(p->key[i]);
	p->n = 0;
	return 0;
}

static void Plan_dealloc(Plan *p)
{
	PyObject_GC_UnTrack(p);
	Plan_clear(p);
	Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Plan_methods[] = {
	{"encode", (PyCFunction)Plan_encode, METH_O,
	 "encode(event) -> the JSON line's object (None: a time this cannot write)."},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject PlanType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sidecar.events._jsonline.Plan",
	.tp_basicsize = sizeof(Plan),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.tp_doc = "Plan(cls, type, entries): entries are (field, key, mode), in order.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Plan_init,
	.tp_dealloc = (destructor)Plan_dealloc,
	.tp_traverse = (traverseproc)Plan_traverse,
	.tp_clear = (inquiry)Plan_clear,
	.tp_methods = Plan_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "sidecar.events._jsonline",
	.m_doc = "The object of an event's JSON line, built from a plan.",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__jsonline(void)
{
	PyObject *m;
	if (PyType_Ready(&PlanType) < 0)
		return NULL;
	TYPE_KEY = PyUnicode_InternFromString("type");
	TIME_KEY = PyUnicode_InternFromString("time");
	PENDING_TEXT = PyUnicode_InternFromString("pending");
	if (!TYPE_KEY || !TIME_KEY || !PENDING_TEXT)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Plan", (PyObject *)&PlanType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
