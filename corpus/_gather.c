/* corpus._gather: a batch of packed training windows in one pass (the loader's fast path).

   `PackedReader.batch` (corpus/loader.py) calls `gather` once per batch. For each window w it copies
   tokens [w·T, w·T + T + 1) of the concatenated shards, widening uint32 to int64, and writes the
   position of each input token in its document and the loss mask of each target: 0 where the target
   is a document's first token or where its shard's loss mask is 0. The numpy path of loader.py
   computes the same arrays (tests/corpus/test_loader.py checks both against a per-document
   reference); this one does it in one call with no temporaries, which is what a batch of a few
   windows needs (numpy's cost there is the number of calls, not the bytes).

   Shards are passed as addresses (uint64 arrays) of their token and mask memory maps, which the
   reader keeps open for as long as it lives: parsing one buffer object per shard on every call would
   cost O(shards) per batch. Everything else is a buffer checked for size here.

   gather(tokens (B, T+1) int64, positions (B, T) int64, loss_mask (B, T) uint8|bool,
          token_addresses (S,) uint64, mask_addresses (S,) uint64 (0: no mask),
          shard_bounds (S+1,) int64, doc_bounds (D+1,) int64, windows (B,) int64, T) -> None
   shard_bounds / doc_bounds: the global index of each shard's / document's first token, then the
   total. Raises IndexError for a window outside [0, (n_tokens - 1) // T). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The last index i in [0, n) with a[i] <= x, for a non-decreasing a with a[0] <= x. Equal
   entries (empty documents or shards) resolve to the last of them: the one that holds token x. */
static Py_ssize_t last_at_or_before(const int64_t *a, Py_ssize_t n, int64_t x) {
    Py_ssize_t lo = 0, hi = n;
    while (hi - lo > 1) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= x)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

static void gather_window(int64_t start, Py_ssize_t T, const uint64_t *token_addr, const uint64_t *mask_addr,
                          const int64_t *shard_bounds, Py_ssize_t n_shards, const int64_t *doc_bounds,
                          Py_ssize_t n_docs, int64_t *restrict tok, int64_t *restrict pos,
                          uint8_t *restrict scored) {
    const int64_t end = start + T + 1;
    /* Tokens, and the shard mask of targets (token j scores as target j - 1), shard by shard. */
    Py_ssize_t k = last_at_or_before(shard_bounds, n_shards + 1, start);
    for (int64_t g = start; g < end; k++) {
        const int64_t shard_end = shard_bounds[k + 1] < end ? shard_bounds[k + 1] : end;
        const int64_t lo = g - shard_bounds[k], n = shard_end - g, col = g - start;
        const uint32_t *restrict src = (const uint32_t *)(uintptr_t)token_addr[k] + lo;
        for (int64_t i = 0; i < n; i++)
            tok[col + i] = src[i];
        /* targets are columns 1..T: the window's first token is never one */
        const int64_t skip = col == 0 ? 1 : 0;
        if (mask_addr[k]) {
            const uint8_t *restrict m = (const uint8_t *)(uintptr_t)mask_addr[k] + lo;
            for (int64_t i = skip; i < n; i++)
                scored[col + i - 1] = m[i] != 0;
        } else if (n > skip) {
            memset(scored + col + skip - 1, 1, (size_t)(n - skip));
        }
        g = shard_end;
    }
    /* Positions of the inputs (columns 0..T-1), document by document; a target that starts a
       document is not scored. */
    Py_ssize_t d = last_at_or_before(doc_bounds, n_docs + 1, start);
    for (int64_t g = start; g < end; d++) {
        const int64_t doc_start = doc_bounds[d];
        const int64_t doc_end = doc_bounds[d + 1] < end ? doc_bounds[d + 1] : end;
        if (doc_end <= g)
            continue; /* an empty document */
        const int64_t col = g - start, p0 = g - doc_start;
        if (p0 == 0 && col > 0)
            scored[col - 1] = 0;
        const int64_t n = (doc_end - start < T ? doc_end - start : T) - col;
        for (int64_t i = 0; i < n; i++)
            pos[col + i] = p0 + i;
        g = doc_end;
    }
}

static int check_size(const Py_buffer *b, Py_ssize_t items, Py_ssize_t itemsize, const char *name) {
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "gather: %s has %zd bytes, expected %zd", name, b->len, items * itemsize);
        return -1;
    }
    return 0;
}

static PyObject *gather(PyObject *self, PyObject *args) {
    Py_buffer tok, pos, scored, token_addr, mask_addr, shard_bounds, doc_bounds, windows;
    Py_ssize_t T;
    if (!PyArg_ParseTuple(args, "w*w*w*y*y*y*y*y*n", &tok, &pos, &scored, &token_addr, &mask_addr,
                          &shard_bounds, &doc_bounds, &windows, &T))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t B = windows.len / 8, n_shards = shard_bounds.len / 8 - 1, n_docs = doc_bounds.len / 8 - 1;
    if (T < 1 || n_shards < 1 || n_docs < 0 || check_size(&tok, B * (T + 1), 8, "tokens") ||
        check_size(&pos, B * T, 8, "positions") || check_size(&scored, B * T, 1, "loss_mask") ||
        check_size(&token_addr, n_shards, 8, "token_addresses") ||
        check_size(&mask_addr, n_shards, 8, "mask_addresses")) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "gather: seq_len and shard bounds must be positive");
        goto done;
    }
    const int64_t *w = windows.buf, *sb = shard_bounds.buf;
    const int64_t n_windows = (sb[n_shards] - 1) / T;
    for (Py_ssize_t b = 0; b < B; b++) {
        if (w[b] < 0 || w[b] >= n_windows) {
            PyErr_Format(PyExc_IndexError, "window index out of range [0, %lld): %lld", (long long)n_windows,
                         (long long)w[b]);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < B; b++)
        gather_window(w[b] * T, T, token_addr.buf, mask_addr.buf, sb, n_shards, doc_bounds.buf, n_docs,
                      (int64_t *)tok.buf + b * (T + 1), (int64_t *)pos.buf + b * T, (uint8_t *)scored.buf + b * T);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&tok);
    PyBuffer_Release(&pos);
    PyBuffer_Release(&scored);
    PyBuffer_Release(&token_addr);
    PyBuffer_Release(&mask_addr);
    PyBuffer_Release(&shard_bounds);
    PyBuffer_Release(&doc_bounds);
    PyBuffer_Release(&windows);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS, "Fill tokens, positions and loss mask of a batch of windows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gather", "The packed loader's batch gather.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__gather(void) { return PyModule_Create(&module); }
