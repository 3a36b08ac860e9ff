// SPDX-License-Identifier: GPL-2.0
/*
 * nflab-xtshow: parse a match's options with an iptables plugin the way
 * iptables does and print what the plugin's save and print functions make
 * of them. Talks to no kernel: the plugin is dlopened and taken from
 * libxtables' pending list (xtables_find_match would ask the kernel for
 * revisions), so it runs on the host with a stock or a kit plugin alike.
 *
 *   nflab-xtshow libxt_NAME.so NAME REVISION 4|6 [OPTION]...
 *
 * prints "save:<text>", "print:<text>" and "data:<hex>" (the userspace
 * part of the match data, what iptables -C/-D compare); an option the
 * plugin refuses exits 2 with its message, as iptables does.
 */
#include <dlfcn.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xtables.h>

/* exported by libxtables but not declared in its public header */
extern struct xtables_match *xtables_pending_matches;

static void show_exit_err(enum xtables_exittype status, const char *msg, ...)
	__attribute__((noreturn, format(printf, 2, 3)));

static struct option show_base_opts[] = {
	{ NULL },
};

static struct xtables_globals show_globals = {
	.option_offset = 0,
	.program_name = "nflab-xtshow",
	.program_version = "1",
	.orig_opts = show_base_opts,
	.exit_err = show_exit_err,
};

static void show_exit_err(enum xtables_exittype status, const char *msg, ...)
{
	va_list args;

	va_start(args, msg);
	fprintf(stderr, "error: ");
	vfprintf(stderr, msg, args);
	fprintf(stderr, "\n");
	va_end(args);
	exit(2);
}

static struct xtables_match *show_find(const char *name, unsigned int rev, uint8_t family)
{
	struct xtables_match *m;

	for (m = xtables_pending_matches; m != NULL; m = m->next)
		if (strcmp(m->name, name) == 0 && m->revision == rev &&
		    (m->family == family || m->family == NFPROTO_UNSPEC))
			return m;
	return NULL;
}

static void show_alloc(struct xtables_match *m)
{
	size_t size = XT_ALIGN(sizeof(struct xt_entry_match)) + m->size;

	m->m = xtables_calloc(1, size);
	m->m->u.match_size = size;
	strcpy(m->m->u.user.name, m->name);
	m->m->u.user.revision = m->revision;
	if (m->udata_size != 0)
		m->udata = xtables_calloc(1, m->udata_size);
	if (m->init != NULL)
		m->init(m->m);
}

/* the option loop of iptables' command parser, for one match */
static void show_parse(struct xtables_match *m, int argc, char **argv)
{
	struct option *opts;
	bool invert = false;
	int c;

	if (m->x6_options == NULL)
		show_exit_err(OTHER_PROBLEM, "%s: not an x6 plugin", m->name);
	opts = xtables_options_xfrm(show_base_opts, NULL, m->x6_options, &m->option_offset);
	if (opts == NULL)
		show_exit_err(OTHER_PROBLEM, "cannot merge the options of %s", m->name);
	optind = 1;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "-:", opts, NULL)) != -1) {
		if (c == 1 && strcmp(optarg, "!") == 0) {
			invert = true;
			continue;
		}
		if (c == 1 || c == '?' || c == ':')
			show_exit_err(PARAMETER_PROBLEM, "bad argument \"%s\"", argv[optind - 1]);
		xtables_option_mpcall(c, argv, invert, m, NULL);
		invert = false;
	}
	if (invert)
		show_exit_err(PARAMETER_PROBLEM, "\"!\" at the end");
	xtables_option_mfcall(m);
}

int main(int argc, char **argv)
{
	/* the ip/ip6 header part of a rule: all zero, as for a rule without -s/-d/-p */
	static unsigned char ip[256];
	struct xtables_match *m;
	uint8_t family;
	size_t i;

	if (argc < 5 || (strcmp(argv[4], "4") != 0 && strcmp(argv[4], "6") != 0)) {
		fprintf(stderr, "usage: %s libxt_NAME.so NAME REVISION 4|6 [OPTION]...\n", argv[0]);
		return 2;
	}
	family = argv[4][0] == '6' ? NFPROTO_IPV6 : NFPROTO_IPV4;
	xtables_init_all(&show_globals, family);
	if (dlopen(argv[1], RTLD_NOW) == NULL) {
		fprintf(stderr, "%s\n", dlerror());
		return 1;
	}
	m = show_find(argv[2], atoi(argv[3]), family);
	if (m == NULL) {
		fprintf(stderr, "%s registers no match %s revision %s for IPv%s\n",
			argv[1], argv[2], argv[3], argv[4]);
		return 1;
	}
	show_alloc(m);
	argv[4] = argv[0];
	show_parse(m, argc - 4, argv + 4);
	printf("save:");
	m->save(ip, m->m);
	printf("\nprint:");
	m->print(ip, m->m, 1);
	printf("\ndata:");
	for (i = 0; i < m->userspacesize; i++)
		printf("%02x", m->m->data[i]);
	printf("\n");
	return 0;
}
