/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lu2k_kshim.ko's in-kernel client interface: what lu2klnd.ko (LNet's lu2k network
 * driver) uses to send and receive through an instance's rings.
 *
 * An instance is created and served as for any user (LU2K_IOC_CREATE, an engine
 * attached); a client binds to it by its first NID. While bound, the instance's RX goes
 * to the client's rx callback instead of the module's selftest sink, and every message
 * the client sent ends with one tx_done call (LU2K_TX_* status), also when the engine
 * goes away (LU2K_TX_ENGINE_GONE). A bound instance cannot be destroyed.
 *
 * Callbacks run on the instance's consumer kthread (or the detaching thread for
 * ENGINE_GONE), in process context, with no lu2k lock that the send path takes held:
 * a callback may send. rx's extents are validated and private to the call; the bytes
 * they name stay in the RX pool only until rx returns.
 */
#ifndef LU2K_KSHIM_H
#define LU2K_KSHIM_H

#include <linux/types.h>
#include "lu2k_ring.h"

struct lu2k_inst;

/* A NID as the ring ABI's descriptors carry it (lu2k_ring.h). */
typedef typeof(((struct lu2k_tx_desc *)0)->peer_nid) lu2k_kshim_nid_t;

struct lu2k_kshim_client {
	void (*rx)(void *priv, const u8 *hdr, const struct lu2k_extent *ext, u32 n,
		   u32 len);
	void (*tx_done)(void *priv, void *ctx, u32 status);
};

/* Binds to the instance whose first NID is nid: -ENOENT none, -EBUSY bound already. */
struct lu2k_inst *lu2k_kshim_bind(const lu2k_kshim_nid_t *nid, const struct lu2k_kshim_client *cl,
				  void *priv);
/* Ends the binding; no callback runs once it returns. Nothing of the client's may be in flight. */
void lu2k_kshim_unbind(struct lu2k_inst *in);
/* TX slots of the instance (each LU2K_MAX_PAYLOAD bytes): the client's credit bound. */
u32 lu2k_kshim_tx_slots(struct lu2k_inst *in);
/* A free TX slot, or -ENOBUFS. */
int lu2k_kshim_tx_get(struct lu2k_inst *in);
/* The slot's LU2K_MAX_PAYLOAD bytes in the TX pool. */
u8 *lu2k_kshim_tx_buf(struct lu2k_inst *in, int slot);
/* Returns a slot that was not sent. */
void lu2k_kshim_tx_abort(struct lu2k_inst *in, int slot);
/*
 * Publishes the slot's len bytes with the 72-byte LNet header to peer; ctx comes back in
 * tx_done. On error (-ENOTCONN no engine, -ENOSPC ring full) the caller still owns the slot.
 */
int lu2k_kshim_tx_send(struct lu2k_inst *in, int slot, const u8 *hdr,
		       const lu2k_kshim_nid_t *peer, u32 len, void *ctx);
/* The RX pool bytes at a validated extent's offset. */
const u8 *lu2k_kshim_rx_buf(struct lu2k_inst *in, u64 off);

#endif
