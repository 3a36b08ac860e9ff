// SPDX-License-Identifier: GPL-2.0
/*
 * nflab-xtprobe: dlopen an iptables plugin the way iptables does and list
 * what its constructor registered with libxtables. Talks to no kernel.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <xtables.h>

/* exported by libxtables but not declared in its public header */
extern struct xtables_match *xtables_pending_matches;
extern struct xtables_target *xtables_pending_targets;

static struct xtables_globals probe_globals = {
	.option_offset = 0,
	.program_name = "nflab-xtprobe",
	.program_version = "1",
};

static void print_opts(const struct xt_option_entry *o)
{
	const char *sep = "";

	for (; o != NULL && o->name != NULL; o++) {
		printf("%s%s", sep, o->name);
		sep = ",";
	}
	printf("\n");
}

int main(int argc, char **argv)
{
	struct xtables_match *m;
	struct xtables_target *t;
	void *h;

	if (argc != 2) {
		fprintf(stderr, "usage: %s libxt_NAME.so\n", argv[0]);
		return 2;
	}
	xtables_init_all(&probe_globals, NFPROTO_IPV4);
	h = dlopen(argv[1], RTLD_NOW);
	if (h == NULL) {
		fprintf(stderr, "%s\n", dlerror());
		return 1;
	}
	for (m = xtables_pending_matches; m != NULL; m = m->next) {
		printf("match name=%s revision=%u family=%u size=%zu userspacesize=%zu options=",
		       m->name, m->revision, m->family, m->size, m->userspacesize);
		print_opts(m->x6_options);
	}
	for (t = xtables_pending_targets; t != NULL; t = t->next) {
		printf("target name=%s revision=%u family=%u size=%zu userspacesize=%zu options=",
		       t->name, t->revision, t->family, t->size, t->userspacesize);
		print_opts(t->x6_options);
	}
	return 0;
}
