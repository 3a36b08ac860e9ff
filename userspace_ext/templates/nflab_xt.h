/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nflab_xt.h: helpers shared by every nflab iptables plugin, for the option
 * types libxtables has no XTTYPE for (address ranges, named choices).
 */
#ifndef _NFLAB_XT_H
#define _NFLAB_XT_H

#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <xtables.h>

#define NFLAB_ARRAY_SIZE(x) (sizeof(x) / sizeof(*(x)))

static inline void nflab_parse_addr(const char *opt, const char *text, uint8_t family,
				    union nf_inet_addr *addr)
{
	const void *parsed = family == NFPROTO_IPV6 ?
		(const void *)xtables_numeric_to_ip6addr(text) :
		(const void *)xtables_numeric_to_ipaddr(text);

	if (!parsed)
		xtables_error(PARAMETER_PROBLEM, "--%s: \"%s\" is not an IPv%c address",
			      opt, text, family == NFPROTO_IPV6 ? '6' : '4');
	memset(addr, 0, sizeof(*addr));
	if (family == NFPROTO_IPV6)
		memcpy(&addr->in6, parsed, sizeof(addr->in6));
	else
		memcpy(&addr->in, parsed, sizeof(addr->in));
}

/* "A-B" or a single "A" (then B = A), as the classic iprange accepts. */
static inline void nflab_parse_range(const char *opt, const char *arg, uint8_t family,
				     union nf_inet_addr *lo, union nf_inet_addr *hi)
{
	char buf[INET6_ADDRSTRLEN * 2 + 2];
	char *dash;

	if (snprintf(buf, sizeof(buf), "%s", arg) >= (int)sizeof(buf))
		xtables_error(PARAMETER_PROBLEM, "--%s: \"%s\" is too long", opt, arg);
	dash = strchr(buf, '-');
	if (dash)
		*dash++ = '\0';
	nflab_parse_addr(opt, buf, family, lo);
	nflab_parse_addr(opt, dash ? dash : buf, family, hi);
	/* both are in network byte order, so memcmp orders them numerically */
	if (memcmp(lo, hi, family == NFPROTO_IPV6 ? 16 : 4) > 0)
		xtables_error(PARAMETER_PROBLEM, "--%s: range start %s is above its end",
			      opt, buf);
}

static inline void nflab_print_addr(const union nf_inet_addr *addr, uint8_t family)
{
	if (family == NFPROTO_IPV6)
		printf("%s", xtables_ip6addr_to_numeric(&addr->in6));
	else
		printf("%s", xtables_ipaddr_to_numeric(&addr->in));
}

static inline void nflab_print_range(const union nf_inet_addr *lo,
				     const union nf_inet_addr *hi, uint8_t family)
{
	printf(" ");
	nflab_print_addr(lo, family);
	printf("-");
	nflab_print_addr(hi, family);
}

static inline unsigned int nflab_parse_choice(const char *opt, const char *arg,
					      const char *const *names, unsigned int n)
{
	unsigned int i;

	for (i = 0; i < n; i++)
		if (strcmp(arg, names[i]) == 0)
			return i;
	xtables_error(PARAMETER_PROBLEM, "--%s: unknown value \"%s\"", opt, arg);
	return 0;
}

#endif /* _NFLAB_XT_H */
