/* SPDX-License-Identifier: GPL-2.0 */
/*
 * layer7_dfa.c: the layer7 plugin's pattern compiler. A regular expression
 * of the subset l7-filter patterns use is compiled, in userspace, into a
 * deterministic automaton over byte classes, so the kernel walks one table
 * entry per payload byte and never backtracks.
 *
 * Syntax: literals; \xHH (a byte); \ before punctuation (that character);
 * . (any byte); [...] and [^...] with ranges, \xHH and [:alpha:]-style
 * classes inside; groups ( ); alternation |; postfix * + ? (stackable);
 * ^ (the start of the connection's data). Everything else is refused with
 * a message naming the construct and its offset: $, {n,m}, \d-style
 * escapes and back-references.
 *
 * Semantics (l7-filter's): the pattern is searched for anywhere in the
 * connection's first bytes unless anchored with ^; letters are matched
 * without regard to case (ASCII), NUL bytes of the data are skipped.
 * Acceptance is sticky: once the pattern has matched, the connection has
 * matched. The automaton is minimised (Moore) and byte classes with the
 * same column are merged; state 0 is the start state.
 *
 * Included into libxt_layer7.c by its template, and compiled on its own by
 * the kit's unit tests (tests/unit/test_layer7_dfa.py); no libxtables here.
 */

#define L7_ARRAY_SIZE(x) (sizeof(x) / sizeof(*(x)))
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define L7_PATTERN_MAX	8192	/* l7-filter's MAX_PATTERN_LEN */
#define L7_NFA_MAX	32768	/* NFA states (at most 3 per pattern byte) */
#define L7_WORK_MAX	4096	/* DFA states before minimisation */
#define L7_DEPTH_MAX	64	/* nested groups */
#define L7_NONE		0xffffu

struct l7_dfa {
	unsigned int states;		/* 1..max_states; state 0 starts */
	unsigned int classes;		/* byte classes: columns of next[] */
	unsigned int accept;		/* absorbing match state, or L7_NONE */
	unsigned int dead;		/* absorbing no-match state, or L7_NONE */
	unsigned char class_of[256];	/* byte -> class (NUL: unused) */
	unsigned int *next;		/* states x classes, row-major */
};

enum { L7N_EPS, L7N_SET, L7N_BOL, L7N_MATCH };

struct l7_nstate {
	unsigned char kind;
	int out[2];		/* -1: none */
	int set;		/* L7N_SET: index into nfa.sets */
};

struct l7_nfa {
	struct l7_nstate *st;
	int n;
	unsigned char (*sets)[32];
	int nsets;
	const unsigned char *p;
	size_t len, pos;
	int depth;
	char *err;
	size_t errlen;
};

struct l7_frag {
	int start, end;		/* end: an L7N_EPS state whose out[0] is open */
};

static void l7_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* a message into err (vsnprintf: a long path is cut, never overflows) */
static void l7_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static int l7_fail(struct l7_nfa *nfa, size_t at, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int l7_fail(struct l7_nfa *nfa, size_t at, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	l7_err(nfa->err, nfa->errlen, "offset %zu: %s", at, msg);
	return -1;
}

static unsigned char l7_fold(unsigned char c)
{
	return c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c;
}

static int l7_bit(const unsigned char *set, unsigned int c)
{
	return set[c >> 3] >> (c & 7) & 1;
}

static void l7_setbit(unsigned char *set, unsigned int c)
{
	set[c >> 3] |= 1u << (c & 7);
}

static int l7_state(struct l7_nfa *nfa, int kind)
{
	struct l7_nstate *s;

	if (nfa->n >= L7_NFA_MAX)
		return l7_fail(nfa, nfa->pos, "the pattern needs more than %d NFA states",
			       L7_NFA_MAX);
	s = &nfa->st[nfa->n];
	s->kind = kind;
	s->out[0] = -1;
	s->out[1] = -1;
	s->set = -1;
	return nfa->n++;
}

static int l7_frag_eps(struct l7_nfa *nfa, struct l7_frag *f)
{
	f->start = l7_state(nfa, L7N_EPS);
	f->end = f->start;
	return f->start < 0 ? -1 : 0;
}

/* a one-state fragment of kind SET (with *set) or BOL, followed by an open end */
static int l7_frag_atom(struct l7_nfa *nfa, struct l7_frag *f, int kind,
			const unsigned char *set)
{
	int a = l7_state(nfa, kind), e = a < 0 ? -1 : l7_state(nfa, L7N_EPS);

	if (e < 0)
		return -1;
	if (set) {
		memcpy(nfa->sets[nfa->nsets], set, 32);
		nfa->st[a].set = nfa->nsets++;
	}
	nfa->st[a].out[0] = e;
	f->start = a;
	f->end = e;
	return 0;
}

/* the set of a literal byte (folded); refused when it can never be in the data */
static int l7_literal(struct l7_nfa *nfa, size_t at, unsigned char c, unsigned char *set)
{
	memset(set, 0, 32);
	if (c == 0)
		return l7_fail(nfa, at, "\\x00 never matches: the data's NUL bytes are skipped");
	l7_setbit(set, l7_fold(c));
	return 0;
}

static int l7_hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* \xHH at p[pos] (the backslash): the byte, or -1 */
static int l7_hex_escape(struct l7_nfa *nfa)
{
	size_t at = nfa->pos;
	int hi = at + 2 < nfa->len ? l7_hexval(nfa->p[at + 2]) : -1;
	int lo = at + 3 < nfa->len ? l7_hexval(nfa->p[at + 3]) : -1;

	if (hi < 0 || lo < 0)
		return l7_fail(nfa, at, "\\x needs two hex digits");
	nfa->pos += 4;
	return hi << 4 | lo;
}

/* one escaped character outside or inside brackets: the byte, or -1 */
static int l7_escape(struct l7_nfa *nfa)
{
	size_t at = nfa->pos;
	unsigned char c;

	if (at + 1 >= nfa->len)
		return l7_fail(nfa, at, "\\ at the end of the pattern");
	c = nfa->p[at + 1];
	if (c == 'x')
		return l7_hex_escape(nfa);
	if (isalnum(c))
		return l7_fail(nfa, at, "\\%c is not supported (escape classes such as \\d and "
			       "back-references such as \\1 are not): write a bracket class "
			       "such as [0-9], or \\xHH for a byte", c);
	nfa->pos += 2;
	return c;
}

static const struct {
	const char *name;
	int (*is)(int c);
} l7_posix[] = {
	{ "alnum", isalnum }, { "alpha", isalpha }, { "blank", isblank },
	{ "cntrl", iscntrl }, { "digit", isdigit }, { "graph", isgraph },
	{ "lower", islower }, { "print", isprint }, { "punct", ispunct },
	{ "space", isspace }, { "upper", isupper }, { "xdigit", isxdigit },
};

/* [:name:] at p[pos]; adds its members (C locale, ASCII) */
static int l7_posix_class(struct l7_nfa *nfa, unsigned char *set)
{
	const char *name = (const char *)nfa->p + nfa->pos + 2;
	const char *end = memchr(name, ':', nfa->len - nfa->pos - 2);
	size_t i, n;
	int c;

	if (!end || end + 1 >= (const char *)nfa->p + nfa->len || end[1] != ']')
		return l7_fail(nfa, nfa->pos, "[: without its closing :]");
	n = end - name;
	for (i = 0; i < L7_ARRAY_SIZE(l7_posix); i++) {
		if (strlen(l7_posix[i].name) != n || strncmp(name, l7_posix[i].name, n))
			continue;
		for (c = 1; c < 128; c++)
			if (l7_posix[i].is(c))
				l7_setbit(set, c);
		nfa->pos += n + 4;
		return 0;
	}
	return l7_fail(nfa, nfa->pos, "unknown class [:%.*s:]", (int)n, name);
}

/* one bracket member (a byte) at p[pos]; -1 on error */
static int l7_bracket_byte(struct l7_nfa *nfa)
{
	if (nfa->p[nfa->pos] == '\\')
		return l7_escape(nfa);
	return nfa->p[nfa->pos++];
}

/* [...] at p[pos]: the folded set of bytes it matches */
static int l7_bracket(struct l7_nfa *nfa, unsigned char *out)
{
	size_t open = nfa->pos, i;
	unsigned char set[32] = { 0 };
	int negate, first = 1, c, hi, any = 0;

	nfa->pos++;
	negate = nfa->pos < nfa->len && nfa->p[nfa->pos] == '^';
	nfa->pos += negate;
	for (;;) {
		if (nfa->pos >= nfa->len)
			return l7_fail(nfa, open, "[ without its closing ]");
		if (nfa->p[nfa->pos] == ']' && !first)
			break;
		first = 0;
		if (nfa->p[nfa->pos] == '[' && nfa->pos + 1 < nfa->len &&
		    nfa->p[nfa->pos + 1] == ':') {
			if (l7_posix_class(nfa, set))
				return -1;
			continue;
		}
		c = l7_bracket_byte(nfa);
		if (c < 0)
			return -1;
		hi = c;
		if (nfa->pos + 1 < nfa->len && nfa->p[nfa->pos] == '-' &&
		    nfa->p[nfa->pos + 1] != ']') {
			size_t at = nfa->pos - 1;

			nfa->pos++;
			hi = l7_bracket_byte(nfa);
			if (hi < 0)
				return -1;
			if (hi < c)
				return l7_fail(nfa, at, "range \\x%02x-\\x%02x is reversed", c, hi);
		}
		for (; c <= hi; c++)
			l7_setbit(set, c);
	}
	nfa->pos++;
	memset(out, 0, 32);
	/* fold the members, then complement over the folded alphabet */
	for (c = 1; c < 256; c++)
		if (l7_bit(set, c))
			l7_setbit(out, l7_fold(c));
	if (negate)
		for (i = 0; i < 32; i++)
			out[i] = ~out[i];
	for (c = 0; c < 256; c++)
		if (c == 0 || (c >= 'A' && c <= 'Z'))
			out[c >> 3] &= ~(1u << (c & 7));
	for (i = 0; i < 32; i++)
		any |= out[i];
	if (!any)
		return l7_fail(nfa, open, "this bracket matches no byte of the data (NULs are "
			       "skipped, letters compared in lower case)");
	return 0;
}

static int l7_alt(struct l7_nfa *nfa, struct l7_frag *f);

static int l7_atom(struct l7_nfa *nfa, struct l7_frag *f)
{
	size_t at = nfa->pos;
	unsigned char c = nfa->p[at], set[32];
	int b;

	switch (c) {
	case '(':
		if (++nfa->depth > L7_DEPTH_MAX)
			return l7_fail(nfa, at, "groups nested deeper than %d", L7_DEPTH_MAX);
		nfa->pos++;
		if (l7_alt(nfa, f))
			return -1;
		if (nfa->pos >= nfa->len || nfa->p[nfa->pos] != ')')
			return l7_fail(nfa, at, "( without its closing )");
		nfa->pos++;
		nfa->depth--;
		return 0;
	case ')':
		return l7_fail(nfa, at, ") without its opening (");
	case '*':
	case '+':
	case '?':
		return l7_fail(nfa, at, "'%c' has nothing to repeat", c);
	case '$':
		return l7_fail(nfa, at, "'$' (end of data) is not supported: the data of a "
			       "connection has no end while it is scanned");
	case '{':
		return l7_fail(nfa, at, "'{' (counted repetition {n,m}) is not supported; write "
			       "\\{ for a literal brace, or repeat the item");
	case '^':
		nfa->pos++;
		return l7_frag_atom(nfa, f, L7N_BOL, NULL);
	case '.':
		nfa->pos++;
		memset(set, 0xff, sizeof(set));
		set[0] &= ~1u;
		for (b = 'A'; b <= 'Z'; b++)
			set[b >> 3] &= ~(1u << (b & 7));
		return l7_frag_atom(nfa, f, L7N_SET, set);
	case '[':
		if (l7_bracket(nfa, set))
			return -1;
		return l7_frag_atom(nfa, f, L7N_SET, set);
	case '\\':
		b = l7_escape(nfa);
		if (b < 0 || l7_literal(nfa, at, b, set))
			return -1;
		return l7_frag_atom(nfa, f, L7N_SET, set);
	default:
		nfa->pos++;
		if (l7_literal(nfa, at, c, set))
			return -1;
		return l7_frag_atom(nfa, f, L7N_SET, set);
	}
}

/* atom followed by any number of * + ? */
static int l7_repeat(struct l7_nfa *nfa, struct l7_frag *f)
{
	if (l7_atom(nfa, f))
		return -1;
	while (nfa->pos < nfa->len && strchr("*+?", nfa->p[nfa->pos])) {
		unsigned char q = nfa->p[nfa->pos++];
		int split = l7_state(nfa, L7N_EPS), end = split < 0 ? -1 : l7_state(nfa, L7N_EPS);

		if (end < 0)
			return -1;
		nfa->st[split].out[0] = f->start;
		nfa->st[split].out[1] = end;
		if (q == '?') {
			nfa->st[f->end].out[0] = end;
			f->start = split;
		} else {
			nfa->st[f->end].out[0] = split;
			if (q == '*')
				f->start = split;
		}
		f->end = end;
	}
	return 0;
}

static int l7_concat(struct l7_nfa *nfa, struct l7_frag *f)
{
	struct l7_frag next;

	if (l7_frag_eps(nfa, f))
		return -1;
	while (nfa->pos < nfa->len && nfa->p[nfa->pos] != '|' && nfa->p[nfa->pos] != ')') {
		if (l7_repeat(nfa, &next))
			return -1;
		nfa->st[f->end].out[0] = next.start;
		f->end = next.end;
	}
	return 0;
}

static int l7_alt(struct l7_nfa *nfa, struct l7_frag *f)
{
	struct l7_frag next;

	if (l7_concat(nfa, f))
		return -1;
	while (nfa->pos < nfa->len && nfa->p[nfa->pos] == '|') {
		int split, end;

		nfa->pos++;
		if (l7_concat(nfa, &next))
			return -1;
		split = l7_state(nfa, L7N_EPS);
		end = split < 0 ? -1 : l7_state(nfa, L7N_EPS);
		if (end < 0)
			return -1;
		nfa->st[split].out[0] = f->start;
		nfa->st[split].out[1] = next.start;
		nfa->st[f->end].out[0] = end;
		nfa->st[next.end].out[0] = end;
		f->start = split;
		f->end = end;
	}
	return 0;
}

/* ---- subset construction ------------------------------------------------ */

struct l7_work {
	const struct l7_nfa *nfa;
	int start;			/* NFA start state */
	int *stack, *mark, stamp;	/* closure scratch */
	int nwords;			/* 64-bit words of a set; the last bit: match */
	uint64_t *sets;			/* L7_WORK_MAX sets of NFA SET states */
	int n;				/* DFA states so far */
	int *hash, hsize;		/* open addressing: DFA state index + 1 */
	unsigned int nclasses;
	unsigned char class_of[256];
	unsigned char rep[256];		/* a representative byte per class */
	unsigned int *next;		/* L7_WORK_MAX x nclasses */
};

static uint64_t *l7_set(const struct l7_work *w, int i)
{
	return w->sets + (size_t)i * w->nwords;
}

static int l7_is_match(const struct l7_work *w, const uint64_t *set)
{
	return set[w->nwords - 1] >> 63 & 1;
}

/* add the closure of NFA state s to set: its SET states and the match bit */
static void l7_closure(struct l7_work *w, int s, uint64_t *set, int bol)
{
	const struct l7_nstate *st = w->nfa->st;
	int sp = 0;

	w->stack[sp++] = s;
	while (sp) {
		s = w->stack[--sp];
		if (s < 0 || w->mark[s] == w->stamp)
			continue;
		w->mark[s] = w->stamp;
		switch (st[s].kind) {
		case L7N_SET:
			set[s / 64] |= 1ull << (s % 64);
			break;
		case L7N_MATCH:
			set[w->nwords - 1] |= 1ull << 63;
			break;
		case L7N_BOL:		/* only at the start of the data */
			if (bol)
				w->stack[sp++] = st[s].out[0];
			break;
		default:
			w->stack[sp++] = st[s].out[0];
			w->stack[sp++] = st[s].out[1];
		}
	}
}

static unsigned int l7_hash(const unsigned int *v, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	size_t i;

	for (i = 0; i < n; i++)
		h = (h ^ v[i]) * 1099511628211ull;
	return (unsigned int)(h ^ h >> 32);
}

/* the DFA state of set (added when new); -1 beyond L7_WORK_MAX */
static int l7_intern(struct l7_work *w, const uint64_t *set)
{
	unsigned int h = l7_hash((const unsigned int *)set, w->nwords * 2) & (w->hsize - 1);

	while (w->hash[h]) {
		int i = w->hash[h] - 1;

		if (!memcmp(l7_set(w, i), set, w->nwords * sizeof(uint64_t)))
			return i;
		h = (h + 1) & (w->hsize - 1);
	}
	if (w->n >= L7_WORK_MAX)
		return -1;
	memcpy(l7_set(w, w->n), set, w->nwords * sizeof(uint64_t));
	w->hash[h] = ++w->n;
	return w->n - 1;
}

/* the set after class k from DFA state d, into t */
static void l7_step(struct l7_work *w, int d, unsigned int k, uint64_t *t)
{
	const struct l7_nfa *nfa = w->nfa;
	const uint64_t *cur = l7_set(w, d);
	unsigned int c = w->rep[k];
	int i;

	memset(t, 0, w->nwords * sizeof(uint64_t));
	w->stamp++;
	for (i = 0; i < w->nwords; i++) {
		uint64_t bits = cur[i] & (i == w->nwords - 1 ? ~(1ull << 63) : ~0ull);

		while (bits) {
			int s = i * 64 + __builtin_ctzll(bits);

			bits &= bits - 1;
			if (l7_bit(nfa->sets[nfa->st[s].set], c))
				l7_closure(w, nfa->st[s].out[0], t, 0);
		}
	}
	l7_closure(w, w->start, t, 0);	/* a search: a match may start here too */
	if (l7_is_match(w, t)) {	/* acceptance is sticky: one accepting set */
		memset(t, 0, w->nwords * sizeof(uint64_t));
		t[w->nwords - 1] = 1ull << 63;
	}
}

/* every DFA state reachable from the start; 0, or -1 beyond L7_WORK_MAX */
static int l7_subsets(struct l7_work *w)
{
	uint64_t *t = calloc(w->nwords, sizeof(uint64_t));
	unsigned int k;
	int d, ret = 0;

	if (!t)
		return -1;
	w->stamp++;
	l7_closure(w, w->start, t, 1);
	if (l7_is_match(w, t)) {
		memset(t, 0, w->nwords * sizeof(uint64_t));
		t[w->nwords - 1] = 1ull << 63;
	}
	l7_intern(w, t);
	for (d = 0; d < w->n && !ret; d++) {
		for (k = 0; k < w->nclasses; k++) {
			int to = d;

			if (!l7_is_match(w, l7_set(w, d))) {
				l7_step(w, d, k, t);
				to = l7_intern(w, t);
			}
			if (to < 0) {
				ret = -1;
				break;
			}
			w->next[(size_t)d * w->nclasses + k] = to;
		}
	}
	free(t);
	return ret;
}

/* byte classes of the folded alphabet: bytes that no set tells apart */
static void l7_classes(const struct l7_nfa *nfa, struct l7_work *w)
{
	unsigned short map[512];
	unsigned int c, i, n = 1;

	memset(w->class_of, 0, sizeof(w->class_of));
	for (i = 0; i < (unsigned int)nfa->nsets; i++) {
		memset(map, 0, sizeof(map));
		n = 0;
		for (c = 1; c < 256; c++) {
			unsigned int key = w->class_of[c] * 2 + l7_bit(nfa->sets[i], c);

			if (c >= 'A' && c <= 'Z')
				continue;
			if (!map[key])
				map[key] = ++n;
			w->class_of[c] = map[key] - 1;
		}
	}
	w->nclasses = n;
	for (c = 255; c >= 1; c--)
		if (c < 'A' || c > 'Z')
			w->rep[w->class_of[c]] = c;
}

/* ---- minimisation, numbering -------------------------------------------- */

/*
 * Moore's partition refinement: states start in two blocks (accepting or
 * not) and are split by the blocks their transitions lead to, until no
 * block splits. blk[] gets each state's block; returns the block count.
 */
static int l7_minimise(const struct l7_work *w, int *blk)
{
	size_t k = w->nclasses, hsize = 1;
	unsigned int *sig = malloc((k + 1) * sizeof(*sig) * w->n);
	int *nblk = malloc(w->n * sizeof(int)), *table, count = 0, prev = -1, s;

	while (hsize < (size_t)w->n * 2)
		hsize <<= 1;
	table = malloc(hsize * sizeof(int));
	if (!sig || !nblk || !table) {
		count = -1;
		goto out;
	}
	for (s = 0; s < w->n; s++)
		blk[s] = l7_is_match(w, l7_set(w, s));
	while (count != prev) {
		prev = count;
		count = 0;
		memset(table, 0xff, hsize * sizeof(int));
		for (s = 0; s < w->n; s++) {
			unsigned int *v = sig + (size_t)s * (k + 1);
			size_t c, h;

			v[0] = blk[s];
			for (c = 0; c < k; c++)
				v[c + 1] = blk[w->next[(size_t)s * k + c]];
			h = l7_hash(v, k + 1) & (hsize - 1);
			while (table[h] >= 0 &&
			       memcmp(sig + (size_t)table[h] * (k + 1), v, (k + 1) * sizeof(*v)))
				h = (h + 1) & (hsize - 1);
			if (table[h] < 0) {
				table[h] = s;
				nblk[s] = count++;
			} else {
				nblk[s] = nblk[table[h]];
			}
		}
		memcpy(blk, nblk, w->n * sizeof(int));
	}
out:
	free(sig);
	free(nblk);
	free(table);
	return count;
}

/*
 * The minimal DFA into out: blocks numbered in breadth-first order from the
 * start (state 0), then byte classes whose columns are equal merged.
 */
static int l7_emit(const struct l7_work *w, const int *blk, int nblk, struct l7_dfa *out)
{
	size_t k = w->nclasses;
	int *rep = malloc(nblk * sizeof(int)), *num = malloc(nblk * sizeof(int));
	int *queue = malloc(nblk * sizeof(int)), head = 0, tail = 0, b, s;
	unsigned int *col = malloc(k * sizeof(*col)), ncls = 0, c, d;
	unsigned int *tab = malloc((size_t)nblk * k * sizeof(*tab));

	if (!rep || !num || !queue || !col || !tab) {
		free(rep), free(num), free(queue), free(col), free(tab);
		return -1;
	}
	for (b = 0; b < nblk; b++)
		num[b] = -1;
	for (s = w->n - 1; s >= 0; s--)
		rep[blk[s]] = s;
	num[blk[0]] = tail;
	queue[tail++] = blk[0];
	while (head < tail) {
		b = queue[head++];
		for (c = 0; c < k; c++) {
			int to = blk[w->next[(size_t)rep[b] * k + c]];

			if (num[to] < 0) {
				num[to] = tail;
				queue[tail++] = to;
			}
			tab[(size_t)num[b] * k + c] = num[to];
		}
	}
	/* merge classes with equal columns */
	for (c = 0; c < k; c++) {
		for (d = 0; d < c; d++) {
			int same = 1;

			for (b = 0; b < tail && same; b++)
				same = tab[(size_t)b * k + c] == tab[(size_t)b * k + d];
			if (same)
				break;
		}
		col[c] = d < c ? col[d] : ncls++;
	}
	out->states = tail;
	out->classes = ncls;
	out->next = malloc((size_t)tail * ncls * sizeof(*out->next));
	if (out->next) {
		for (b = 0; b < tail; b++)
			for (c = 0; c < k; c++)
				out->next[(size_t)b * ncls + col[c]] = tab[(size_t)b * k + c];
		out->class_of[0] = 0;
		for (c = 1; c < 256; c++)
			out->class_of[c] = col[w->class_of[l7_fold(c)]];
		out->accept = L7_NONE;
		out->dead = L7_NONE;
		for (b = 0; b < tail; b++) {
			int loops = 1;

			for (c = 0; c < ncls && loops; c++)
				loops = out->next[(size_t)b * ncls + c] == (unsigned int)b;
			if (loops && l7_is_match(w, l7_set(w, rep[queue[b]])))
				out->accept = b;
			else if (loops)
				out->dead = b;
		}
	}
	free(rep), free(num), free(queue), free(col), free(tab);
	return out->next ? 0 : -1;
}

/* ---- the compiler ------------------------------------------------------- */

static void l7_work_free(struct l7_work *w)
{
	free(w->stack);
	free(w->mark);
	free(w->sets);
	free(w->hash);
	free(w->next);
}

/* the DFA of an NFA, within max_states states and a next[] of max_table cells */
static int l7_determinise(struct l7_nfa *nfa, int start, struct l7_dfa *out,
			  unsigned int max_states, unsigned int max_table)
{
	struct l7_work w = { .nfa = nfa, .start = start, .hsize = 2 * L7_WORK_MAX };
	int *blk = NULL, nblk, ret = -1;

	w.nwords = (nfa->n + 64) / 64 + 1;
	l7_classes(nfa, &w);
	w.stack = malloc(2 * nfa->n * sizeof(int) + sizeof(int));
	w.mark = calloc(nfa->n, sizeof(int));
	w.sets = malloc((size_t)L7_WORK_MAX * w.nwords * sizeof(uint64_t));
	w.hash = calloc(w.hsize, sizeof(int));
	w.next = malloc((size_t)L7_WORK_MAX * w.nclasses * sizeof(unsigned int));
	if (!w.stack || !w.mark || !w.sets || !w.hash || !w.next) {
		l7_err(nfa->err, nfa->errlen, "out of memory");
		goto out;
	}
	if (l7_subsets(&w)) {
		l7_err(nfa->err, nfa->errlen, "the automaton needs more than %d states before "
		       "minimisation", L7_WORK_MAX);
		goto out;
	}
	blk = malloc(w.n * sizeof(int));
	nblk = blk ? l7_minimise(&w, blk) : -1;
	if (nblk < 0 || l7_emit(&w, blk, nblk, out)) {
		l7_err(nfa->err, nfa->errlen, "out of memory");
		goto out;
	}
	if (out->accept == L7_NONE)
		l7_err(nfa->err, nfa->errlen, "the pattern can never match");
	else if (out->states > max_states || out->states * out->classes > max_table)
		l7_err(nfa->err, nfa->errlen, "the automaton has %u states x %u byte classes; the "
		       "kernel table holds at most %u states and %u cells", out->states,
		       out->classes, max_states, max_table);
	else
		ret = 0;
	if (ret) {
		free(out->next);
		out->next = NULL;
	}
out:
	free(blk);
	l7_work_free(&w);
	return ret;
}

/*
 * Compile pattern (len bytes) into out (out->next is malloc'ed; free it).
 * 0, or -1 with a message in err: "offset N: what is wrong".
 */
static int l7_compile(const char *pattern, size_t len, struct l7_dfa *out,
		      unsigned int max_states, unsigned int max_table, char *err, size_t errlen)
{
	struct l7_nfa nfa = { .p = (const unsigned char *)pattern, .len = len,
			      .err = err, .errlen = errlen };
	struct l7_frag f;
	int match, ret = -1;

	memset(out, 0, sizeof(*out));
	if (len == 0 || len > L7_PATTERN_MAX) {
		l7_err(err, errlen, "the pattern has %zu bytes, need 1..%d", len, L7_PATTERN_MAX);
		return -1;
	}
	nfa.st = malloc(L7_NFA_MAX * sizeof(*nfa.st));
	nfa.sets = malloc((len + 1) * sizeof(*nfa.sets));
	if (!nfa.st || !nfa.sets) {
		l7_err(err, errlen, "out of memory");
		goto out;
	}
	if (l7_alt(&nfa, &f))
		goto out;
	if (nfa.pos < nfa.len) {	/* l7_alt stops only at an unopened ) */
		l7_fail(&nfa, nfa.pos, ") without its opening (");
		goto out;
	}
	match = l7_state(&nfa, L7N_MATCH);
	if (match < 0)
		goto out;
	nfa.st[f.end].out[0] = match;
	ret = l7_determinise(&nfa, f.start, out, max_states, max_table);
out:
	free(nfa.st);
	free(nfa.sets);
	return ret;
}

/* ---- .pat files --------------------------------------------------------- */

/*
 * The pattern of proto from the l7-filter file at path: '#' comments and
 * blank lines skipped, the first other line names the protocol (up to a
 * space or tab; it must be proto), the next one is the pattern; what
 * follows (userspace pattern=..., userspace flags=...) is not read.
 * 1: found; 0: no such file; -1: a bad file (message in err).
 */
static int l7_read_pat(const char *path, const char *proto, char *pattern, size_t size,
		       char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	int seen_name = 0, ret = -1;

	if (!f)
		return errno == ENOENT || errno == ENOTDIR ? 0 : (l7_err(err, errlen,
			"%s: %s", path, strerror(errno)), -1);
	while ((n = getline(&line, &cap, f)) >= 0) {
		while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = '\0';
		if (n == 0 || line[0] == '#')
			continue;
		if (!seen_name) {
			line[strcspn(line, " \t")] = '\0';
			if (strcmp(line, proto)) {
				l7_err(err, errlen, "%s names protocol \"%s\", not \"%s\"", path,
				       line, proto);
				goto out;
			}
			seen_name = 1;
			continue;
		}
		if ((size_t)n >= size) {
			l7_err(err, errlen, "%s: the pattern has %zd bytes, at most %zu", path, n,
			       size - 1);
			goto out;
		}
		memcpy(pattern, line, n + 1);
		ret = 1;
		goto out;
	}
	l7_err(err, errlen, "%s: no %s line", path, seen_name ? "pattern" : "protocol name");
out:
	free(line);
	fclose(f);
	return ret;
}

/* <dir>/[<sub>/]<proto>.pat into path; -1 when it does not fit */
static int l7_path(char *path, size_t pathlen, const char *dir, const char *sub,
		   const char *proto, char *err, size_t errlen)
{
	size_t n = strlen(dir) + 1 + strlen(sub) + !!*sub + strlen(proto) + sizeof(".pat");

	if (n > pathlen) {
		l7_err(err, errlen, "the path of %s.pat in %s is longer than %zu bytes", proto, dir,
		       pathlen - 1);
		return -1;
	}
	sprintf(path, *sub ? "%s/%s/%s.pat" : "%s/%s%s.pat", dir, sub, proto);
	return 0;
}

static int l7_dirent_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/*
 * Find and read <dir>/<proto>.pat, else <dir>/<sub>/<proto>.pat for the
 * subdirectories of dir in name order (the l7-protocols package installs
 * into protocols/, extra/, ...). path gets the file read. 0 or -1 (err).
 */
static int l7_find_pat(const char *dir, const char *proto, char *path, size_t pathlen,
		       char *pattern, size_t size, char *err, size_t errlen)
{
	char **subs = NULL;
	size_t nsub = 0, i;
	int ret;
	DIR *d;
	struct dirent *e;

	if (!*proto || strchr(proto, '/') || proto[0] == '.') {
		l7_err(err, errlen, "\"%s\" is not a protocol name", proto);
		return -1;
	}
	if (l7_path(path, pathlen, dir, "", proto, err, errlen))
		return -1;
	ret = l7_read_pat(path, proto, pattern, size, err, errlen);
	if (ret)
		return ret > 0 ? 0 : -1;
	d = opendir(dir);
	if (!d) {
		l7_err(err, errlen, "cannot read the pattern directory %s: %s", dir,
		       strerror(errno));
		return -1;
	}
	while ((e = readdir(d))) {
		char **more;

		if (e->d_name[0] == '.')
			continue;
		more = realloc(subs, (nsub + 1) * sizeof(*subs));
		if (!more)
			break;
		subs = more;
		subs[nsub] = strdup(e->d_name);
		if (subs[nsub])
			nsub++;
	}
	closedir(d);
	if (nsub > 1)	/* qsort(NULL, 0, ...) is undefined */
		qsort(subs, nsub, sizeof(*subs), l7_dirent_cmp);
	ret = 0;
	for (i = 0; i < nsub && !ret; i++) {
		ret = l7_path(path, pathlen, dir, subs[i], proto, err, errlen);
		if (!ret)
			ret = l7_read_pat(path, proto, pattern, size, err, errlen);
	}
	for (i = 0; i < nsub; i++)
		free(subs[i]);
	free(subs);
	if (!ret)
		l7_err(err, errlen, "no pattern file %s.pat in %s or its subdirectories", proto,
		       dir);
	return ret > 0 ? 0 : -1;
}
