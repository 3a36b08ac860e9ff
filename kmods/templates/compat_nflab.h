/* SPDX-License-Identifier: GPL-2.0 */
/*
 * compat_nflab.h: the one place where nflab templates meet kernel API
 * differences between the kernels the kit supports (Debian 6.1 and 6.12).
 * Decide by feature macro where the kernel offers one, by version otherwise;
 * templates use only the nflab_* names below.
 */
#ifndef _NFLAB_COMPAT_H
#define _NFLAB_COMPAT_H

#include <linux/version.h>
#include <linux/netfilter.h>
#include <linux/netfilter/x_tables.h>
#include <linux/string.h>

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0)
#error "nflab templates need Linux 6.1 or newer"
#endif

/* NFPROTO_INET hooks at NF_INET_INGRESS exist since 5.10; netdev ingress always. */
#ifdef CONFIG_NETFILTER_INGRESS
#define NFLAB_HAVE_NETDEV_INGRESS 1
#else
#define NFLAB_HAVE_NETDEV_INGRESS 0
#endif

/* netdev egress hooks arrived in 5.16 behind CONFIG_NETFILTER_EGRESS. */
#ifdef CONFIG_NETFILTER_EGRESS
#define NFLAB_HAVE_NETDEV_EGRESS 1
#else
#define NFLAB_HAVE_NETDEV_EGRESS 0
#endif

/* strlcpy() is gone since 6.8; strscpy() exists on every supported kernel. */
#define nflab_strscpy(dst, src, size) strscpy(dst, src, size)

/*
 * timer_container_of() replaced from_timer() in 6.16; keep templates on one
 * name so a kernel bump is a one-line change here.
 */
#ifdef timer_container_of
#define nflab_timer_container_of(var, t, field) timer_container_of(var, t, field)
#else
#define nflab_timer_container_of(var, t, field) from_timer(var, t, field)
#endif

/* netdev_hold()/netdev_put() with refcount trackers exist since 5.19/6.0. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 0, 0)
#define nflab_dev_hold(dev, tracker) netdev_hold(dev, tracker, GFP_KERNEL)
#define nflab_dev_put(dev, tracker) netdev_put(dev, tracker)
#else
#define nflab_dev_hold(dev, tracker) dev_hold(dev)
#define nflab_dev_put(dev, tracker) dev_put(dev)
#endif

/*
 * nf_conncount (connlimit): on 6.1 nf_conncount_init()/destroy() take the
 * family and get/put the netns conntrack reference themselves; by 6.12 they
 * take only the key length and the caller does nf_ct_netns_get()/put()
 * (the change lies between the two lines the kit supports). Only for
 * templates that include <net/netfilter/nf_conntrack_count.h>.
 */
#ifdef _NF_CONNTRACK_COUNT_H
#include <net/netfilter/nf_conntrack.h>

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 12, 0)
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
