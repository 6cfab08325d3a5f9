// SPDX-License-Identifier: GPL-2.0
/*
 * lu2klnd.ko - LNet's lu2k network driver: LNet messages through lu2k's rings.
 *
 * An NI of a lu2k network (`lnetctl net add --net lu2k0 --if eth0`) takes its NID from
 * the interface's IPv4 address and binds to the lu2k_kshim.ko instance created for that
 * NID (lu2k_kshim.h); lu2k's engine, attached to the instance, carries the messages over
 * UDP. The two modules stay apart so lu2k_kshim.ko keeps loading where no Lustre is
 * built; this one needs lnet.ko and lu2k_kshim.ko.
 *
 * send: LNet's header becomes the 72-byte wire header (lnet_hdr_to_nid4), the payload is
 * copied from the message's kiov into a TX pool slot, and the slot is published; the
 * engine's completion finalizes the message. receive: an RX descriptor's header goes to
 * lnet_parse; lnd_recv copies the payload from the RX pool into LNet's kiov, and the RX
 * buffer goes back to the engine when lnet_parse returns. A message LNet delays (no MD
 * yet) is copied out first by lnd_eager_recv. So across the LNet boundary payload is
 * copied once each way; userspace copies nothing.
 *
 * NIDs: LNet knows this driver as LU2KLND (patches/lustre: the next free LND number,
 * not reserved upstream); lu2k's ring ABI and engine know the type 0x4C32
 * (ring-abi/src/nid.rs). The network number and address are the same, so the type is
 * swapped at this boundary in both directions, in the header and the peer NID.
 *
 * A peer the engine reports unreachable, timed out or reset is marked down with
 * lnet_notify. What the engine wrote was validated by lu2k_kshim.ko; the header's
 * payload length is checked against the descriptor's here, and lnet_parse checks the
 * rest as it does for any LND.
 */
#define DEBUG_SUBSYSTEM S_LND

#include <linux/module.h>
#include <linux/slab.h>
#include <linux/mm.h>
#include <lnet/lib-lnet.h>

#include "lu2k_kshim.h"

/* lu2k's LND type in the ring ABI (ring-abi/src/nid.rs: LndType::LU2K). */
#define LU2K_RING_LND 0x4C32ULL
#define LU2K_PEER_TIMEOUT 180

static int credits = 32;
module_param(credits, int, 0444);
MODULE_PARM_DESC(credits, "messages in flight per NI (bounded by the instance's TX slots)");

static int peer_credits = 16;
module_param(peer_credits, int, 0444);
MODULE_PARM_DESC(peer_credits, "messages in flight per peer");

struct lu2klnd_ni {
	struct lnet_ni *ni;
	struct lu2k_inst *inst;
	atomic64_t rx_bad, rx_dropped, tx_failed;
};

/* An RX payload: in the RX pool during lnet_parse, or a private copy once delayed. */
struct lu2klnd_rx {
	struct lu2klnd_ni *net;
	const struct lu2k_extent *ext;
	u32 n;
	u32 len;
	u8 *copy;			/* kvmalloc'd by eager_recv; the struct is kmalloc'd then */
};

static u64 to_ring(u64 nid4);

/* LNet's NID as the ring ABI's: the same size, number and address bytes, lu2k's type. */
#ifdef LU2K_NID_SIZE4
/* Ring ABI 2: the 24-byte NID, LNet's large NID with a wider type. */
static void ring_nid(const struct lnet_nid *n, lu2k_kshim_nid_t *r)
{
	memset(r, 0, sizeof(*r));
	r->size = n->nid_size;
	r->lnd = LU2K_LND_LU2K;
	r->num = be16_to_cpu(n->nid_num);
	BUILD_BUG_ON(sizeof(r->addr) != sizeof(n->nid_addr));
	memcpy(r->addr, n->nid_addr, sizeof(r->addr));
}
#else
/* Ring ABI 1: the 64-bit NID. */
static void ring_nid(const struct lnet_nid *n, lu2k_kshim_nid_t *r)
{
	*r = to_ring(lnet_nid_to_nid4(n));
}
#endif

/* A 64-bit NID of LNet's lu2k type as the ring's (and back); other types stay as they are. */
static u64 to_ring(u64 nid4)
{
	if (nid4 >> 48 != LU2KLND)
		return nid4;
	return (nid4 & ((1ULL << 48) - 1)) | (LU2K_RING_LND << 48);
}

static u64 from_ring(u64 nid)
{
	if (nid >> 48 != LU2K_RING_LND)
		return nid;
	return (nid & ((1ULL << 48) - 1)) | ((u64)LU2KLND << 48);
}

static const u8 *rx_piece(struct lu2klnd_rx *rx, u32 i)
{
	return lu2k_kshim_rx_buf(rx->net->inst, rx->ext[i].offset);
}

/* Copies mlen payload bytes into LNet's kiov at offset. */
static void rx_copy(struct lu2klnd_rx *rx, unsigned int niov, struct bio_vec *kiov,
		    unsigned int offset, unsigned int mlen)
{
	u32 i, done = 0, chunk;

	if (rx->copy) {
		lnet_copy_flat2kiov(niov, kiov, offset, rx->len, rx->copy, 0, mlen);
		return;
	}
	for (i = 0; i < rx->n && done < mlen; i++) {
		chunk = min_t(u32, rx->ext[i].len, mlen - done);
		lnet_copy_flat2kiov(niov, kiov, offset + done, rx->ext[i].len,
				    (void *)rx_piece(rx, i), 0, chunk);
		done += chunk;
	}
}

static void lu2klnd_rx(void *priv, const u8 *whdr, const struct lu2k_extent *ext, u32 n,
		       u32 len)
{
	struct lu2klnd_ni *net = priv;
	struct lu2klnd_rx rx = { .net = net, .ext = ext, .n = n, .len = len };
	struct _lnet_hdr_nid4 h4;
	struct lnet_hdr hdr;
	struct lnet_nid from;
	int rc;

	BUILD_BUG_ON(sizeof(h4) != LU2K_LNET_HDR_LEN);
	memcpy(&h4, whdr, sizeof(h4));
	h4.dest_nid = cpu_to_le64(from_ring(le64_to_cpu(h4.dest_nid)));
	h4.src_nid = cpu_to_le64(from_ring(le64_to_cpu(h4.src_nid)));
	lnet_hdr_from_nid4(&hdr, (struct lnet_hdr_nid4 *)&h4);
	/* GET and ACK carry no payload; PUT and REPLY exactly payload_length bytes. */
	if (hdr.payload_length != len) {
		atomic64_inc(&net->rx_bad);
		CNETERR("lu2k: %s sent %u payload bytes, its header says %u: dropped\n",
			libcfs_nidstr(&hdr.src_nid), len, hdr.payload_length);
		return;
	}
	from = hdr.src_nid;
	rc = lnet_parse(net->ni, &hdr, &from, &rx, 0);
	if (rc < 0)
		atomic64_inc(&net->rx_dropped);
}

/* lnet_parse delays the message (no MD yet): the RX buffer goes back, so copy it now. */
static int lu2klnd_eager_recv(struct lnet_ni *ni, void *private, struct lnet_msg *msg,
			      void **new_privatep)
{
	struct lu2klnd_rx *rx = private, *d;
	u32 i, at = 0;

	d = kmalloc(sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	*d = *rx;
	d->ext = NULL;
	d->copy = kvmalloc(max_t(u32, rx->len, 1), GFP_KERNEL);
	if (!d->copy) {
		kfree(d);
		return -ENOMEM;
	}
	for (i = 0; i < rx->n; i++) {
		memcpy(d->copy + at, rx_piece(rx, i), rx->ext[i].len);
		at += rx->ext[i].len;
	}
	*new_privatep = d;
	return 0;
}

static int lu2klnd_recv(struct lnet_ni *ni, void *private, struct lnet_msg *msg,
			int delayed, unsigned int niov, struct bio_vec *kiov,
			unsigned int offset, unsigned int mlen, unsigned int rlen)
{
	struct lu2klnd_rx *rx = private;

	if (msg && mlen)
		rx_copy(rx, niov, kiov, offset, mlen);
	if (rx->copy) {
		kvfree(rx->copy);
		kfree(rx);
	}
	if (msg)
		lnet_finalize(msg, 0);
	return 0;
}

static int lu2klnd_send(struct lnet_ni *ni, void *private, struct lnet_msg *msg)
{
	struct lu2klnd_ni *net = ni->ni_data;
	struct _lnet_hdr_nid4 h4;
	lu2k_kshim_nid_t peer;
	int s, rc;

	/* The wire header carries 64-bit NIDs: IPv4 peers only. */
	if (msg->msg_len > LU2K_MAX_PAYLOAD || !nid_is_nid4(&msg->msg_target.nid))
		return -EINVAL;
	ring_nid(&msg->msg_target.nid, &peer);
	lnet_hdr_to_nid4(&msg->msg_hdr, (struct lnet_hdr_nid4 *)&h4);
	h4.dest_nid = cpu_to_le64(to_ring(le64_to_cpu(h4.dest_nid)));
	h4.src_nid = cpu_to_le64(to_ring(le64_to_cpu(h4.src_nid)));
	s = lu2k_kshim_tx_get(net->inst);
	if (s < 0) {
		msg->msg_health_status = LNET_MSG_STATUS_LOCAL_DROPPED;
		return s;
	}
	if (msg->msg_len)
		lnet_copy_kiov2flat(LU2K_MAX_PAYLOAD, lu2k_kshim_tx_buf(net->inst, s), 0,
				    msg->msg_niov, msg->msg_kiov, msg->msg_offset,
				    msg->msg_len);
	rc = lu2k_kshim_tx_send(net->inst, s, (const u8 *)&h4, &peer, msg->msg_len, msg);
	if (rc) {
		lu2k_kshim_tx_abort(net->inst, s);
		msg->msg_health_status = rc == -ENOTCONN ? LNET_MSG_STATUS_LOCAL_ERROR :
				       LNET_MSG_STATUS_LOCAL_DROPPED;
		return rc == -ENOTCONN ? -EHOSTUNREACH : rc;
	}
	return 0;
}

static void lu2klnd_tx_done(void *priv, void *ctx, u32 status)
{
	struct lu2klnd_ni *net = priv;
	struct lnet_msg *msg = ctx;
	struct lnet_nid peer = msg->msg_target.nid;
	int rc = 0;

	switch (status) {
	case LU2K_TX_OK:
		break;
	case LU2K_TX_PEER_UNREACHABLE:
	case LU2K_TX_TIMED_OUT:
	case LU2K_TX_PEER_RESET:
		msg->msg_health_status = status == LU2K_TX_PEER_RESET ?
					 LNET_MSG_STATUS_REMOTE_ERROR :
					 LNET_MSG_STATUS_NETWORK_TIMEOUT;
		rc = status == LU2K_TX_TIMED_OUT ? -ETIMEDOUT : -EHOSTUNREACH;
		lnet_notify(net->ni, &peer, false, false, ktime_get_seconds());
		break;
	default:
		msg->msg_health_status = LNET_MSG_STATUS_LOCAL_ERROR;
		rc = -EIO;
		break;
	}
	if (rc)
		atomic64_inc(&net->tx_failed);
	lnet_finalize(msg, rc);
}

static const struct lu2k_kshim_client lu2klnd_client = {
	.rx = lu2klnd_rx,
	.tx_done = lu2klnd_tx_done,
};

static int lu2klnd_startup(struct lnet_ni *ni)
{
	struct lnet_ioctl_config_lnd_cmn_tunables *t = &ni->ni_net->net_tunables;
	struct lnet_inetdev *ifaces = NULL;
	struct lu2klnd_ni *net;
	struct lu2k_inst *inst;
	lu2k_kshim_nid_t nid;
	int rc, i, slots;

	rc = lnet_inet_enumerate(&ifaces, ni->ni_net_ns, false);
	if (rc < 0)
		return rc;
	i = lnet_inet_select(ni, ifaces, rc);
	if (i < 0) {
		kfree(ifaces);
		return -ENODEV;
	}
	if (!ni->ni_interface || !strlen(ni->ni_interface))
		lnet_ni_add_interface(ni, ifaces[i].li_name);
	ni->ni_nid.nid_size = 0;
	ni->ni_nid.nid_addr[0] = ifaces[i].li_ipaddr;
	ni->ni_dev_cpt = ifaces[i].li_cpt;
	kfree(ifaces);

	ring_nid(&ni->ni_nid, &nid);
	net = kzalloc(sizeof(*net), GFP_KERNEL);
	if (!net)
		return -ENOMEM;
	net->ni = ni;
	inst = lu2k_kshim_bind(&nid, &lu2klnd_client, net);
	if (IS_ERR(inst)) {
		CERROR("lu2k: %s: %s; create a lu2k_kshim instance with this NID (lu2k's type %#llx) and attach lu2k-engine to it before adding the network\n",
		       libcfs_nidstr(&ni->ni_nid),
		       PTR_ERR(inst) == -EBUSY ? "its lu2k_kshim instance is bound to another NI" :
						  "no lu2k_kshim instance has this NID",
		       LU2K_RING_LND);
		kfree(net);
		return PTR_ERR(inst);
	}
	net->inst = inst;
	ni->ni_data = net;

	/* Every message in flight holds a TX slot: credits never exceed the slots. */
	slots = lu2k_kshim_tx_slots(inst);
	if (t->lct_max_tx_credits == -1)
		t->lct_max_tx_credits = credits;
	if (t->lct_peer_tx_credits == -1)
		t->lct_peer_tx_credits = peer_credits;
	if (t->lct_peer_rtr_credits == -1)
		t->lct_peer_rtr_credits = 0;
	if (t->lct_peer_timeout == -1)
		t->lct_peer_timeout = LU2K_PEER_TIMEOUT;
	/* LNet splits the NI's credits over its CPTs, each share at least a peer's. */
	t->lct_max_tx_credits = clamp(t->lct_max_tx_credits, 1, max(slots / 2, 1));
	t->lct_peer_tx_credits = clamp(t->lct_peer_tx_credits, 1,
				       max(t->lct_max_tx_credits / 2, 1));
	CDEBUG(D_NET, "lu2k: %s up, credits %d, peer credits %d, %d TX slots\n",
	       libcfs_nidstr(&ni->ni_nid), t->lct_max_tx_credits, t->lct_peer_tx_credits,
	       slots);
	pr_info("lu2klnd: %s bound to its lu2k_kshim instance (%d TX slots, credits %d/%d)\n",
		libcfs_nidstr(&ni->ni_nid), slots, t->lct_max_tx_credits,
		t->lct_peer_tx_credits);
	return 0;
}

static void lu2klnd_shutdown(struct lnet_ni *ni)
{
	struct lu2klnd_ni *net = ni->ni_data;

	if (!net)
		return;
	lu2k_kshim_unbind(net->inst);
	pr_info("lu2klnd: %s down (rx bad %lld, rx dropped %lld, tx failed %lld)\n",
		libcfs_nidstr(&ni->ni_nid), (long long)atomic64_read(&net->rx_bad),
		(long long)atomic64_read(&net->rx_dropped),
		(long long)atomic64_read(&net->tx_failed));
	ni->ni_data = NULL;
	kfree(net);
}

static const struct lnet_lnd the_lu2klnd = {
	.lnd_type	= LU2KLND,
	.lnd_startup	= lu2klnd_startup,
	.lnd_shutdown	= lu2klnd_shutdown,
	.lnd_send	= lu2klnd_send,
	.lnd_recv	= lu2klnd_recv,
	.lnd_eager_recv	= lu2klnd_eager_recv,
};

static int __init lu2klnd_init(void)
{
	lnet_register_lnd(&the_lu2klnd);
	return 0;
}

static void __exit lu2klnd_exit(void)
{
	lnet_unregister_lnd(&the_lu2klnd);
}

MODULE_AUTHOR("lu2k");
MODULE_DESCRIPTION("LNet network driver over lu2k's rings (lu2k_kshim.ko)");
MODULE_LICENSE("GPL");

module_init(lu2klnd_init);
module_exit(lu2klnd_exit);
