/* SPDX-License-Identifier: GPL-2.0 */
/*
 * compat_nflab.h: the one place where nflab templates meet kernel API
 * differences. Every decision keys on a feature: a Kconfig symbol, or a probe
 * result from nflab_features.h, which the kit generates per kernel from what
 * its headers declare (kmods/probes.toml). Never on LINUX_VERSION_CODE:
 * Debian backports API changes, so a version says little about the API.
 * Templates use only the nflab_* names below (and NFLAB_HAVE_* for code that
 * only exists with a feature).
 */
#ifndef _NFLAB_COMPAT_H
#define _NFLAB_COMPAT_H

#include <linux/netfilter.h>
#include <linux/netfilter/x_tables.h>
#include <linux/string.h>
#include <linux/u64_stats_sync.h>

#include "nflab_features.h"

/* netdev ingress hooks exist behind CONFIG_NETFILTER_INGRESS. */
#ifdef CONFIG_NETFILTER_INGRESS
#define NFLAB_HAVE_NETDEV_INGRESS 1
#else
#define NFLAB_HAVE_NETDEV_INGRESS 0
#endif

/* netdev egress hooks exist behind CONFIG_NETFILTER_EGRESS. */
#ifdef CONFIG_NETFILTER_EGRESS
#define NFLAB_HAVE_NETDEV_EGRESS 1
#else
#define NFLAB_HAVE_NETDEV_EGRESS 0
#endif

/* strscpy() exists on every kernel the kit serves; strlcpy() and strncpy() do not. */
#define nflab_strscpy(dst, src, size) strscpy(dst, src, size)

#if NFLAB_HAVE_TIMER_CONTAINER_OF
#define nflab_timer_container_of(var, t, field) timer_container_of(var, t, field)
#else
#define nflab_timer_container_of(var, t, field) from_timer(var, t, field)
#endif

#if NFLAB_HAVE_TIMER_DELETE
#define nflab_timer_delete(t) timer_delete(t)
#define nflab_timer_delete_sync(t) timer_delete_sync(t)
#else
#define nflab_timer_delete(t) del_timer(t)
#define nflab_timer_delete_sync(t) del_timer_sync(t)
#endif

/*
 * Takes val off a per-CPU u64_stats_t counter (inside its update section).
 * Without u64_stats_sub(), adding the two's complement through
 * u64_stats_add(), whose argument is an unsigned long, is exact only where a
 * long has 64 bits: a 32-bit build stops here instead of miscounting.
 */
#if NFLAB_HAVE_U64_STATS_SUB
#define nflab_u64_stats_sub(p, val) u64_stats_sub(p, val)
#else
static inline void nflab_u64_stats_sub(u64_stats_t *p, s64 val)
{
	BUILD_BUG_ON(BITS_PER_LONG != 64);
	u64_stats_add(p, -val);
}
#endif

#if NFLAB_HAVE_GET_RANDOM_U32_BELOW
#define nflab_get_random_u32_below(ceil) get_random_u32_below(ceil)
#else
#define nflab_get_random_u32_below(ceil) prandom_u32_max(ceil)
#endif

#if NFLAB_HAVE_PDE_DATA
#define nflab_pde_data(inode) pde_data(inode)
#else
#define nflab_pde_data(inode) PDE_DATA(inode)
#endif

#if NFLAB_HAVE_MODULE_IMPORT_NS_STRING
#define nflab_module_import_ns(ns) MODULE_IMPORT_NS(#ns)
#else
#define nflab_module_import_ns(ns) MODULE_IMPORT_NS(ns)
#endif

/*
 * nf_conncount (connlimit): where nf_conncount_init()/destroy() take the
 * family they get/put the netns conntrack reference themselves; where they
 * take only the key length the caller does nf_ct_netns_get()/put(). Only
 * for templates that include <net/netfilter/nf_conntrack_count.h>.
 */
#ifdef _NF_CONNTRACK_COUNT_H
#include <net/netfilter/nf_conntrack.h>

#if NFLAB_HAVE_NF_CONNCOUNT_INIT_KEYLEN
static inline struct nf_conncount_data *
nflab_conncount_init(struct net *net, u8 family, unsigned int keylen)
{
	struct nf_conncount_data *data;
	int ret = nf_ct_netns_get(net, family);

	if (ret < 0)
		return ERR_PTR(ret);
	data = nf_conncount_init(net, keylen);
	if (IS_ERR(data))
		nf_ct_netns_put(net, family);
	return data;
}

static inline void nflab_conncount_destroy(struct net *net, u8 family,
					   struct nf_conncount_data *data)
{
	nf_conncount_destroy(net, data);
	nf_ct_netns_put(net, family);
}
#else
static inline struct nf_conncount_data *
nflab_conncount_init(struct net *net, u8 family, unsigned int keylen)
{
	return nf_conncount_init(net, family, keylen);	/* gets conntrack for family */
}

static inline void nflab_conncount_destroy(struct net *net, u8 family,
					   struct nf_conncount_data *data)
{
	nf_conncount_destroy(net, family, data);	/* puts it */
}
#endif
#endif /* _NF_CONNTRACK_COUNT_H */

/* nla_strscpy(): a NUL-terminated copy of a string attribute. */
#if NFLAB_HAVE_NLA_STRSCPY
#define nflab_nla_strscpy(dst, nla, size) nla_strscpy(dst, nla, size)
#else
#define nflab_nla_strscpy(dst, nla, size) nla_strlcpy(dst, nla, size)
#endif

/* Names of hook points, for logs and /proc files. */
static inline const char *nflab_hook_name(u8 pf, unsigned int hooknum)
{
	static const char * const inet[] = {
		[NF_INET_PRE_ROUTING]	= "PRE_ROUTING",
		[NF_INET_LOCAL_IN]	= "LOCAL_IN",
		[NF_INET_FORWARD]	= "FORWARD",
		[NF_INET_LOCAL_OUT]	= "LOCAL_OUT",
		[NF_INET_POST_ROUTING]	= "POST_ROUTING",
	};

	if (pf == NFPROTO_NETDEV)
		return hooknum == NF_NETDEV_INGRESS ? "INGRESS" : "EGRESS";
	return hooknum < ARRAY_SIZE(inet) ? inet[hooknum] : "?";
}

#endif /* _NFLAB_COMPAT_H */
