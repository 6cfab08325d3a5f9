// SPDX-License-Identifier: GPL-2.0
/*
 * lu2k_kshim.ko - lu2k's kernel half: the shared ring ABI of
 * ring-abi/include/lu2k_ring.h served from the kernel through /dev/lu2k.
 *
 * An instance owns one region (vmalloc_user, mapped into the engine with
 * remap_vmalloc_range), its NIDs and its ring sets. One engine at a time attaches to an
 * instance (LU2K_IOC_ATTACH with its eventfds, mmap, LU2K_IOC_ACK). The module is the
 * kshim side of every ring: it produces TX descriptors and RX returns, and consumes TX
 * completions and RX descriptors on one consumer kthread per attached instance.
 *
 * Doorbells: to the engine, eventfd_signal() when the engine's need_wakeup word asks for
 * it; to the module, the engine writes its to_kshim eventfd, whose wait queue the module
 * hooks (as vhost and KVM's irqfd do), so an engine rings the module exactly as it rings
 * userspace kshim. The consumer arms its need_wakeup word, re-checks its rings after a
 * full barrier and only then sleeps (the ABI's Dekker handshake).
 *
 * Producers are many: load-generator kthreads and the consumer (REPLYs). Each TX ring
 * has one producer at a time: a per-core spinlock serializes them.
 *
 * The engine is not trusted: every slot it wrote is copied once into private memory,
 * validated, then used; an invalid completion or RX descriptor is refused and counted,
 * and ring indices out of range are counted and never followed. Payload bytes in the RX
 * pool are read in place: an engine changing them only spoils its own message.
 *
 * When the engine's file goes away (its fd and mapping closed, or the process died),
 * every message in flight fails back with LU2K_TX_ENGINE_GONE, the rings are reset and
 * a new engine may attach. An open engine file holds a module reference, so rmmod is
 * refused while an engine is attached.
 *
 * The load generator and sink are the module's own LNet selftest, with the selftest
 * pattern of kshim/src/selftest.rs: a PUT's payload is the pattern seeded by its
 * hdr_data, a GET asks for sink_length bytes and the REPLY carries the pattern seeded by
 * the GET's match_bits. Either side of a transfer may be this module or userspace kshim.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/miscdevice.h>
#include <linux/fs.h>
#include <linux/file.h>
#include <linux/mm.h>
#include <linux/vmalloc.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/eventfd.h>
#include <linux/poll.h>
#include <linux/kthread.h>
#include <linux/wait.h>
#include <linux/sched.h>
#include <linux/sort.h>
#include <linux/ktime.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/atomic.h>
#include <linux/kref.h>
#include <linux/rwsem.h>
#include <linux/build_bug.h>
#include <linux/overflow.h>
#include <linux/compat.h>
#include <linux/version.h>
#include <asm/unaligned.h>

#include "lu2k_ring.h"
#include "lu2k_kshim.h"

#define LU2K_MAX_INSTANCES 16
#define LU2K_PID 12345
#define LU2K_PORTAL 42
/* TX slots only REPLYs may take, so a busy generator cannot starve the sink. */
#define LU2K_REPLY_RESERVE 2
#define LU2K_MAX_REGION BIT_ULL(30)
/* RX buffers per instance: bounds CREATE's arithmetic well inside u64. */
#define LU2K_MAX_RX_BUFS BIT(20)
/* A load's timeout_ms: a killed or aborted load ends within this. */
#define LU2K_MAX_TIMEOUT_MS 60000

/* LNet header fields (kshim/src/hdr.rs). */
#define H_DEST_NID 0
#define H_SRC_NID 8
#define H_DEST_PID 16
#define H_SRC_PID 20
#define H_TYPE 24
#define H_PAYLOAD_LEN 28
#define H_WMD 32
#define H_WMD_OBJECT 40
#define H_MATCH_BITS 48
#define H_PUT_HDR_DATA 56
#define H_PUT_PTL 64
#define H_GET_PTL 56
#define H_GET_SINK_LEN 64
#define LNET_MSG_PUT 1
#define LNET_MSG_GET 2
#define LNET_MSG_REPLY 3

/* Ring slot sizes: the descriptors' (the region header announces them). */
#define LU2K_TXD ((u32)sizeof(struct lu2k_tx_desc))
#define LU2K_RXD ((u32)sizeof(struct lu2k_rx_desc))

/* Room for a NID in logs: an IPv6 address, '@' and two 16-bit numbers. */
#define LU2K_NID_STR 64

/* Counters, in the order of struct lu2k_dev_stats from tx_sent on. */
enum {
	ST_TX_SENT, ST_TX_OK, ST_TX_FAILED, ST_TX_ENGINE_GONE, ST_BAD_COMPLETIONS,
	ST_BAD_RX, ST_BAD_INDEX, ST_RX_MSGS, ST_RX_BYTES, ST_PUTS_VERIFIED,
	ST_PUTS_CORRUPT, ST_GETS_ANSWERED, ST_REPLIES_FAILED, ST_REPLIES_UNMATCHED,
	ST_NOTICES, ST_ATTACHES, ST_DETACHES, ST_DOORBELLS, ST_WAKEUPS,
	ST_IDLE_TIMEOUTS_WITH_WORK, ST_COUNT
};

enum { TX_FREE, TX_BUSY, TX_INFLIGHT };

struct lu2k_inst;

struct lu2k_load {
	struct kref ref;
	struct lu2k_inst *inst;
	struct lu2k_dev_load a;
	atomic_t next;
	atomic_t running;
	atomic_t inflight;
	atomic64_t ok, failed, gone, bytes;
	bool abort;
	wait_queue_head_t wq;
};

struct lu2k_tx {
	u64 cookie;
	u32 core;
	u32 len;
	u8 state;
	struct lu2k_load *load;
	void *ctx;			/* a bound client's message (lu2k_kshim.h) */
};

struct lu2k_core {
	struct lu2k_inst *inst;
	struct lu2k_control_block *cb;
	struct lu2k_tx_desc *tx;
	struct lu2k_tx_completion *txd;
	struct lu2k_rx_desc *rx;
	struct lu2k_rx_return *rxr;
	u32 tx_n, txd_n, rx_n, rxr_n;
	spinlock_t tx_lock;		/* one TX producer at a time */
	bool live;			/* under tx_lock: an engine serves the rings */
	u32 tx_prod;			/* under tx_lock */
	u32 txd_cons, rx_cons, rxr_prod;	/* the consumer kthread's */
	struct eventfd_ctx *to_engine;	/* set and cleared under tx_lock */
	struct eventfd_ctx *to_kshim;
	struct file *kick_file;
	bool kick_hooked;
	wait_queue_entry_t kick_wait;
	poll_table kick_pt;
};

struct lu2k_inst {
	u32 id;
	u32 cores;
	u32 conns_per_peer;	/* cores per peer, 1..cores: see lu2k_stripe() */
	u32 nid_count;
	struct lu2k_nid nids[LU2K_DEV_MAX_NIDS];
	void *region;
	size_t size;
	struct lu2k_region_header hdr;	/* the module's own copy, never read back */
	atomic_t users;
	struct mutex lock;		/* attach, ack, detach */
	struct file *engine;
	bool serving;
	struct task_struct *consumer;
	wait_queue_head_t consumer_wq;
	atomic_t kick;
	wait_queue_head_t attach_wq;
	atomic_t gen;
	spinlock_t slot_lock;		/* the free stack and txs[].state */
	u32 nslots, nfree;
	u32 *free_stack;
	struct lu2k_tx *txs;
	wait_queue_head_t slot_wq;
	struct lu2k_extent *rx_ext;	/* the consumer's private extent copy */
	struct mutex ping_mutex;	/* one ping load at a time */
	spinlock_t ping_lock;
	bool ping_waiting, ping_got, ping_corrupt;
	u64 ping_seq;
	u32 ping_size;
	ktime_t ping_t0, ping_rtt;
	wait_queue_head_t ping_wq;
	atomic64_t st[ST_COUNT];
	/* An in-kernel client (lu2k_kshim.h); its callbacks run under client_sem read. */
	struct rw_semaphore client_sem;
	const struct lu2k_kshim_client *client;
	void *client_priv;
	struct lu2k_core core[];
};

static DEFINE_MUTEX(insts_lock);
/* Serializes ATTACH: a file's private_data is checked and set under it. */
static DEFINE_MUTEX(attach_lock);
static struct lu2k_inst *insts[LU2K_MAX_INSTANCES];

static inline void st_add(struct lu2k_inst *in, int i, u64 v)
{
	atomic64_add(v, &in->st[i]);
}

/* A NID for logs: ADDR@TYPE.NUM (the LND type and network number in decimal). */
static const char *nid_str(const struct lu2k_nid *nid, char *buf, size_t n)
{
	if (nid->size == LU2K_NID_SIZE16)
		snprintf(buf, n, "%pI6c@%u.%u", nid->addr, nid->lnd, nid->num);
	else
		snprintf(buf, n, "%pI4@%u.%u", nid->addr, nid->lnd, nid->num);
	return buf;
}

static inline u8 *pool_tx(struct lu2k_inst *in, u32 slot)
{
	return (u8 *)in->region + in->hdr.tx_pool_off + (u64)slot * LU2K_MAX_PAYLOAD;
}

static inline const u8 *rx_pool(struct lu2k_inst *in, u64 off)
{
	return (const u8 *)in->region + in->hdr.rx_pool_off + off;
}

/* The selftest pattern (kshim/src/selftest.rs): byte i of seed s is byte i % 8 of word i / 8. */
static inline u64 pat_word(u64 seed, u64 g)
{
	u64 x = seed ^ (g * 0x9E3779B97F4A7C15ULL);

	return (x ^ (x >> 29)) * 0xBF58476D1CE4E5B9ULL;
}

static inline u8 pat_byte(u64 seed, u64 i)
{
	return (u8)(pat_word(seed, i >> 3) >> ((i & 7) * 8));
}

static void pat_fill(u64 seed, u64 at, u8 *p, u32 len)
{
	for (; len && (at & 7); len--)
		*p++ = pat_byte(seed, at++);
	for (; len >= 8; len -= 8, p += 8, at += 8)
		put_unaligned_le64(pat_word(seed, at >> 3), p);
	for (; len; len--)
		*p++ = pat_byte(seed, at++);
}

static bool pat_check(u64 seed, u64 at, const u8 *p, u32 len)
{
	for (; len && (at & 7); len--)
		if (*p++ != pat_byte(seed, at++))
			return false;
	for (; len >= 8; len -= 8, p += 8, at += 8)
		if (get_unaligned_le64(p) != pat_word(seed, at >> 3))
			return false;
	for (; len; len--)
		if (*p++ != pat_byte(seed, at++))
			return false;
	return true;
}

/* ---- instances ------------------------------------------------------------------ */

static struct lu2k_inst *inst_get(u32 id)
{
	struct lu2k_inst *in = NULL;

	if (id >= LU2K_MAX_INSTANCES)
		return NULL;
	mutex_lock(&insts_lock);
	in = insts[id];
	if (in)
		atomic_inc(&in->users);
	mutex_unlock(&insts_lock);
	return in;
}

static void inst_put(struct lu2k_inst *in)
{
	atomic_dec(&in->users);
}

/*
 * Places len bytes at the next offset aligned to align. The engine chose the sizes: a
 * length or end past LU2K_MAX_REGION sets *bad, so no sum can wrap.
 */
static u64 place(u64 *next, u64 len, u64 align, bool *bad)
{
	u64 off = ALIGN(*next, align);

	if (*next > LU2K_MAX_REGION || len > LU2K_MAX_REGION ||
	    check_add_overflow(off, len, next) || *next > LU2K_MAX_REGION) {
		*bad = true;
		*next = LU2K_MAX_REGION + 1;
		return 0;
	}
	return off;
}

/* The layout of ring-abi's Layout::new (ring-abi/src/layout.rs), for the module's config. */
static int inst_layout(struct lu2k_inst *in, const struct lu2k_dev_create *a)
{
	struct lu2k_region_header *h = &in->hdr;
	struct lu2k_core_entry *ce;
	u64 next = 0, share, n = a->ring_entries;
	bool bad = false;
	u32 c;

	ce = kcalloc(a->cores, sizeof(*ce), GFP_KERNEL);
	if (!ce)
		return -ENOMEM;
	place(&next, sizeof(*h), LU2K_CACHE_LINE, &bad);
	h->core_table_off = place(&next, (u64)a->cores * sizeof(*ce), LU2K_CACHE_LINE,
				  &bad);
	for (c = 0; c < a->cores; c++)
		ce[c].ctrl_off = place(&next, sizeof(struct lu2k_control_block),
				       LU2K_CACHE_LINE, &bad);
	for (c = 0; c < a->cores; c++) {
		ce[c].tx = (struct lu2k_ring_info){ place(&next, n * LU2K_TXD, 64, &bad), n,
						    LU2K_TXD };
		ce[c].tx_done = (struct lu2k_ring_info){ place(&next, n * 16, 64, &bad), n, 16 };
		ce[c].rx = (struct lu2k_ring_info){ place(&next, n * LU2K_RXD, 64, &bad), n,
						    LU2K_RXD };
		ce[c].rx_return = (struct lu2k_ring_info){ place(&next, n * 8, 64, &bad), n, 8 };
	}
	h->tx_pool_len = (u64)a->tx_slots * LU2K_MAX_PAYLOAD;
	h->tx_pool_off = place(&next, h->tx_pool_len, LU2K_PAGE, &bad);
	share = (u64)a->rx_tables_per_core * LU2K_RX_TABLE_BYTES;
	h->rx_tables_len = share * a->cores;
	h->rx_tables_off = place(&next, h->rx_tables_len, LU2K_PAGE, &bad);
	for (c = 0; c < a->cores; c++) {
		ce[c].rx_tables_off = h->rx_tables_off + share * c;
		ce[c].rx_tables = a->rx_tables_per_core;
	}
	h->rx_pool_len = (u64)a->rx_buf_size * a->rx_buf_count;
	h->rx_pool_off = place(&next, h->rx_pool_len, LU2K_PAGE, &bad);
	h->total_size = ALIGN(next, LU2K_PAGE);
	if (bad || h->total_size > LU2K_MAX_REGION) {
		kfree(ce);
		return -EFBIG;
	}
	h->magic = LU2K_MAGIC;
	h->version_major = LU2K_VERSION_MAJOR;
	h->version_minor = LU2K_VERSION_MINOR;
	h->header_size = sizeof(*h);
	/* The module rings eventfds only: no LU2K_FEAT_FUTEX_WAKE. */
	h->features = LU2K_FEAT_RX_INDIRECT;
	h->cores = a->cores;
	h->conns_per_peer = in->conns_per_peer;
	h->core_entry_size = sizeof(*ce);
	h->rx_buf_size = a->rx_buf_size;
	h->rx_buf_count = a->rx_buf_count;

	in->size = h->total_size;
	in->region = vmalloc_user(in->size);
	if (!in->region) {
		kfree(ce);
		return -ENOMEM;
	}
	memcpy(in->region, h, sizeof(*h));
	memcpy((u8 *)in->region + h->core_table_off, ce, (size_t)a->cores * sizeof(*ce));
	for (c = 0; c < a->cores; c++) {
		struct lu2k_core *k = &in->core[c];
		u8 *base = in->region;

		k->inst = in;
		k->cb = (void *)(base + ce[c].ctrl_off);
		k->tx = (void *)(base + ce[c].tx.off);
		k->txd = (void *)(base + ce[c].tx_done.off);
		k->rx = (void *)(base + ce[c].rx.off);
		k->rxr = (void *)(base + ce[c].rx_return.off);
		k->tx_n = n;
		k->txd_n = n;
		k->rx_n = n;
		k->rxr_n = n;
		spin_lock_init(&k->tx_lock);
	}
	kfree(ce);
	return 0;
}

static void inst_free(struct lu2k_inst *in)
{
	vfree(in->region);
	kfree(in->txs);
	kfree(in->free_stack);
	kfree(in->rx_ext);
	kfree(in);
}

static long ioc_create(void __user *arg)
{
	struct lu2k_dev_create a;
	struct lu2k_inst *in;
	char nbuf[LU2K_NID_STR];
	u32 i, id;
	int err, found;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	if (!a.cores || a.cores > LU2K_DEV_MAX_CORES || !a.nid_count ||
	    a.nid_count > LU2K_DEV_MAX_NIDS || !is_power_of_2(a.ring_entries) ||
	    a.ring_entries > LU2K_MAX_RING_ENTRIES || a.tx_slots <= LU2K_REPLY_RESERVE + 1 ||
	    a.ring_entries < a.tx_slots || !a.rx_buf_size || a.rx_buf_size % 64 ||
	    a.rx_buf_size > LU2K_MAX_PAYLOAD || !a.rx_buf_count ||
	    a.rx_buf_count > LU2K_MAX_RX_BUFS || !a.rx_tables_per_core ||
	    a.rx_tables_per_core > a.ring_entries || a.conns_per_peer > a.cores || a.reserved)
		return -EINVAL;
	for (i = 0; i < a.nid_count; i++)
		if (!lu2k_nid_valid(&a.nids[i]))
			return -EINVAL;
	in = kzalloc(struct_size(in, core, a.cores), GFP_KERNEL);
	if (!in)
		return -ENOMEM;
	in->cores = a.cores;
	in->conns_per_peer = a.conns_per_peer ? a.conns_per_peer : 1;
	in->nid_count = a.nid_count;
	memcpy(in->nids, a.nids, sizeof(in->nids));
	mutex_init(&in->lock);
	mutex_init(&in->ping_mutex);
	init_rwsem(&in->client_sem);
	spin_lock_init(&in->slot_lock);
	spin_lock_init(&in->ping_lock);
	init_waitqueue_head(&in->consumer_wq);
	init_waitqueue_head(&in->attach_wq);
	init_waitqueue_head(&in->slot_wq);
	init_waitqueue_head(&in->ping_wq);
	in->nslots = a.tx_slots;
	in->txs = kcalloc(in->nslots, sizeof(*in->txs), GFP_KERNEL);
	in->free_stack = kcalloc(in->nslots, sizeof(u32), GFP_KERNEL);
	in->rx_ext = kcalloc(LU2K_MAX_RX_EXTENTS, sizeof(struct lu2k_extent), GFP_KERNEL);
	err = -ENOMEM;
	if (!in->txs || !in->free_stack || !in->rx_ext)
		goto fail;
	for (i = 0; i < in->nslots; i++)
		in->free_stack[i] = in->nslots - 1 - i;
	in->nfree = in->nslots;
	err = inst_layout(in, &a);
	if (err)
		goto fail;
	mutex_lock(&insts_lock);
	for (id = 0; id < LU2K_MAX_INSTANCES && insts[id]; id++)
		;
	if (id == LU2K_MAX_INSTANCES) {
		mutex_unlock(&insts_lock);
		err = -ENOSPC;
		goto fail;
	}
	in->id = id;
	insts[id] = in;
	mutex_unlock(&insts_lock);
	a.instance = id;
	a.region_size = in->size;
	if (copy_to_user(arg, &a, sizeof(a))) {
		/* Nobody learnt the number: unpublish it unless someone found it already. */
		mutex_lock(&insts_lock);
		found = atomic_read(&in->users);
		if (!found)
			insts[id] = NULL;
		mutex_unlock(&insts_lock);
		if (!found)
			inst_free(in);
		return -EFAULT;
	}
	pr_info("instance %u: %u cores, region %zu bytes, NID %s\n", id, in->cores,
		in->size, nid_str(&in->nids[0], nbuf, sizeof(nbuf)));
	return 0;
fail:
	inst_free(in);
	return err;
}

static long ioc_destroy(void __user *arg)
{
	struct lu2k_inst *in;
	u32 id;

	if (get_user(id, (u32 __user *)arg))
		return -EFAULT;
	if (id >= LU2K_MAX_INSTANCES)
		return -ENOENT;
	mutex_lock(&insts_lock);
	in = insts[id];
	if (!in) {
		mutex_unlock(&insts_lock);
		return -ENOENT;
	}
	if (atomic_read(&in->users)) {
		mutex_unlock(&insts_lock);
		return -EBUSY;
	}
	insts[id] = NULL;
	mutex_unlock(&insts_lock);
	inst_free(in);
	return 0;
}

/* ---- TX: slots, publishing, completion ----------------------------------------- */

static int slot_get(struct lu2k_inst *in, bool reply)
{
	int s = -1;

	spin_lock(&in->slot_lock);
	if (in->nfree > (reply ? 0 : LU2K_REPLY_RESERVE)) {
		s = in->free_stack[--in->nfree];
		in->txs[s].state = TX_BUSY;
	}
	spin_unlock(&in->slot_lock);
	return s;
}

static void slot_put(struct lu2k_inst *in, u32 s)
{
	spin_lock(&in->slot_lock);
	in->txs[s].state = TX_FREE;
	in->txs[s].load = NULL;
	in->txs[s].ctx = NULL;
	in->free_stack[in->nfree++] = s;
	spin_unlock(&in->slot_lock);
	wake_up(&in->slot_wq);
}

static void load_release(struct kref *ref)
{
	kfree(container_of(ref, struct lu2k_load, ref));
}

/* Ends a message that was in flight: accounts for it and frees its slot. */
static void tx_finish(struct lu2k_inst *in, u32 s, u32 status)
{
	struct lu2k_tx *t = &in->txs[s];
	struct lu2k_load *l = t->load;
	void *ctx = t->ctx;

	if (status == LU2K_TX_OK) {
		st_add(in, ST_TX_OK, 1);
	} else {
		st_add(in, ST_TX_FAILED, 1);
		if (status == LU2K_TX_ENGINE_GONE)
			st_add(in, ST_TX_ENGINE_GONE, 1);
		if (!l && !ctx)
			st_add(in, ST_REPLIES_FAILED, 1);
	}
	if (ctx) {
		/* The slot first: the client may send again from tx_done. */
		slot_put(in, s);
		down_read(&in->client_sem);
		if (in->client)
			in->client->tx_done(in->client_priv, ctx, status);
		up_read(&in->client_sem);
		return;
	}
	if (l) {
		if (status == LU2K_TX_OK) {
			atomic64_inc(&l->ok);
			atomic64_add(t->len, &l->bytes);
		} else {
			atomic64_inc(&l->failed);
			if (status == LU2K_TX_ENGINE_GONE)
				atomic64_inc(&l->gone);
		}
		if (atomic_dec_and_test(&l->inflight))
			wake_up(&l->wq);
		kref_put(&l->ref, load_release);
	}
	slot_put(in, s);
}

/* Rings the engine's doorbell if it asked for one; after a release store of an index. */
static void ring_engine(struct lu2k_core *c)
{
	/* Pairs with the engine's barrier between arming need_wakeup and re-reading its rings. */
	smp_mb();
	if ((READ_ONCE(c->cb->to_engine_need_wakeup.value) & LU2K_WAKE_EVENTFD) && c->to_engine) {
		eventfd_signal(c->to_engine, 1);
		st_add(c->inst, ST_DOORBELLS, 1);
	}
}

/*
 * Publishes slot s (payload already in the TX pool) with LNet header hdr to peer on the
 * core that carries it: the peer's core, or with conns_per_peer > 1 one of its cores
 * by the cookie's hash (lu2k_stripe(), as the userspace kshim). The cookie is drawn
 * first because it picks the core; a send refused after that only skips a generation.
 * On success the slot is in flight and l (if any) holds one more reference; on error
 * the caller still owns the slot.
 */
static int tx_send(struct lu2k_inst *in, u32 s, const u8 *hdr, const struct lu2k_nid *peer,
		   u32 len, struct lu2k_load *l)
{
	u64 cookie = ((u64)(u32)atomic_inc_return(&in->gen) << 32) | s;
	struct lu2k_core *c = &in->core[lu2k_stripe(lu2k_shard(peer, in->cores), in->cores,
						    in->conns_per_peer, cookie)];
	struct lu2k_tx *t = &in->txs[s];
	struct lu2k_tx_desc d;
	u32 cons, used;

	memset(&d, 0, sizeof(d));
	d.peer_nid = *peer;
	memcpy(d.hdr, hdr, LU2K_LNET_HDR_LEN);
	d.total_len = len;
	if (len) {
		d.nfrags = 1;
		d.ext[0].pool = LU2K_POOL_TX;
		d.ext[0].len = len;
		d.ext[0].offset = (u64)s * LU2K_MAX_PAYLOAD;
	}
	spin_lock(&c->tx_lock);
	if (!c->live) {
		spin_unlock(&c->tx_lock);
		return -ENOTCONN;
	}
	/* Acquire: the engine's copy of a slot is done before it moved this index. */
	cons = smp_load_acquire(&c->cb->tx_cons.value);
	used = c->tx_prod - cons;
	if (used >= c->tx_n) {
		spin_unlock(&c->tx_lock);
		if (used > c->tx_n)
			st_add(in, ST_BAD_INDEX, 1);
		return -ENOSPC;
	}
	d.cookie = cookie;
	t->cookie = d.cookie;
	t->core = c - in->core;
	t->len = len;
	t->load = l;
	if (l) {
		kref_get(&l->ref);
		atomic_inc(&l->inflight);
	}
	spin_lock(&in->slot_lock);
	t->state = TX_INFLIGHT;
	spin_unlock(&in->slot_lock);
	memcpy(&c->tx[c->tx_prod & (c->tx_n - 1)], &d, sizeof(d));
	c->tx_prod++;
	/* Release: the descriptor and its payload are written before the engine sees the index. */
	smp_store_release(&c->cb->tx_prod.value, c->tx_prod);
	ring_engine(c);
	spin_unlock(&c->tx_lock);
	st_add(in, ST_TX_SENT, 1);
	return 0;
}

/* A completion copied out of the ring: refused and counted unless it names a message in flight. */
static void tx_complete(struct lu2k_core *c, const struct lu2k_tx_completion *cp)
{
	struct lu2k_inst *in = c->inst;
	u32 s = (u32)cp->cookie;
	bool ok = false;

	if (cp->status <= LU2K_TX_SHUTDOWN && s < in->nslots) {
		spin_lock(&in->slot_lock);
		ok = in->txs[s].state == TX_INFLIGHT && in->txs[s].cookie == cp->cookie &&
		     in->txs[s].core == (u32)(c - in->core);
		if (ok)
			in->txs[s].state = TX_BUSY;
		spin_unlock(&in->slot_lock);
	}
	if (!ok) {
		st_add(in, ST_BAD_COMPLETIONS, 1);
		return;
	}
	tx_finish(in, s, cp->status);
}

/* ---- RX: validation and the sink ----------------------------------------------- */

/* Validates a private RX descriptor copy; fills in->rx_ext with a private extent copy. */
static int rx_validate(struct lu2k_inst *in, const struct lu2k_rx_desc *d)
{
	const struct lu2k_region_header *h = &in->hdr;
	u32 n = d->nfrags, i;
	u64 sum = 0;

	if (d->flags & ~LU2K_RX_INDIRECT || !lu2k_nid_valid(&d->src_nid))
		return -EINVAL;
	if (d->total_len > LU2K_MAX_PAYLOAD)
		return -EMSGSIZE;
	if (d->flags & LU2K_RX_INDIRECT) {
		const struct lu2k_extent *t = &d->ext[0];

		if (!n || n > LU2K_MAX_RX_EXTENTS)
			return -E2BIG;
		if (t->pool != LU2K_POOL_RX_TABLES || t->flags ||
		    t->len != n * sizeof(struct lu2k_extent) || t->offset % 8 ||
		    t->offset > h->rx_tables_len || t->len > h->rx_tables_len - t->offset)
			return -ERANGE;
		memcpy(in->rx_ext, (u8 *)in->region + h->rx_tables_off + t->offset, t->len);
	} else {
		if (n > LU2K_INLINE_EXTENTS)
			return -E2BIG;
		memcpy(in->rx_ext, d->ext, n * sizeof(struct lu2k_extent));
	}
	/* From here on only the copy is read. */
	barrier();
	for (i = 0; i < n; i++) {
		const struct lu2k_extent *e = &in->rx_ext[i];

		if (e->pool != LU2K_POOL_RX || e->flags || !e->len ||
		    e->offset > h->rx_pool_len || e->len > h->rx_pool_len - e->offset)
			return -ERANGE;
		sum += e->len;
	}
	return sum == d->total_len ? 0 : -EBADMSG;
}

static void rx_put(struct lu2k_inst *in, u32 n, const u8 *hdr, u32 len)
{
	u64 seed = get_unaligned_le64(hdr + H_PUT_HDR_DATA), at = 0;
	bool ok = get_unaligned_le32(hdr + H_PAYLOAD_LEN) == len;
	u32 i;

	for (i = 0; i < n && ok; i++) {
		const struct lu2k_extent *e = &in->rx_ext[i];

		ok = pat_check(seed, at, rx_pool(in, e->offset), e->len);
		at += e->len;
	}
	st_add(in, ok ? ST_PUTS_VERIFIED : ST_PUTS_CORRUPT, 1);
	if (!ok)
		pr_warn_ratelimited("instance %u: PUT seed %llx from %llx is corrupt\n", in->id,
				    seed, get_unaligned_le64(hdr + H_SRC_NID));
}

/* Answers a GET from peer (the descriptor's source: the header cannot name an IPv6 NID). */
static void rx_get(struct lu2k_inst *in, const u8 *hdr, const struct lu2k_nid *peer)
{
	u32 len = min_t(u32, get_unaligned_le32(hdr + H_GET_SINK_LEN), LU2K_MAX_PAYLOAD);
	u8 r[LU2K_LNET_HDR_LEN] = {};
	int s = slot_get(in, true);

	if (s < 0) {
		st_add(in, ST_REPLIES_FAILED, 1);
		return;
	}
	pat_fill(get_unaligned_le64(hdr + H_MATCH_BITS), 0, pool_tx(in, s), len);
	put_unaligned_le64(get_unaligned_le64(hdr + H_SRC_NID), r + H_DEST_NID);
	put_unaligned_le64(get_unaligned_le64(hdr + H_DEST_NID), r + H_SRC_NID);
	put_unaligned_le32(get_unaligned_le32(hdr + H_SRC_PID), r + H_DEST_PID);
	put_unaligned_le32(get_unaligned_le32(hdr + H_DEST_PID), r + H_SRC_PID);
	put_unaligned_le32(LNET_MSG_REPLY, r + H_TYPE);
	put_unaligned_le32(len, r + H_PAYLOAD_LEN);
	memcpy(r + H_WMD, hdr + H_WMD, 16);
	if (tx_send(in, s, r, peer, len, NULL)) {
		slot_put(in, s);
		st_add(in, ST_REPLIES_FAILED, 1);
		return;
	}
	st_add(in, ST_GETS_ANSWERED, 1);
}

static void rx_reply(struct lu2k_inst *in, u32 n, const u8 *hdr, u32 len)
{
	u64 seq = get_unaligned_le64(hdr + H_WMD_OBJECT), at = 0;
	bool ok = true;
	ktime_t rtt;
	u32 i, size;

	spin_lock(&in->ping_lock);
	if (!in->ping_waiting || seq != in->ping_seq) {
		spin_unlock(&in->ping_lock);
		st_add(in, ST_REPLIES_UNMATCHED, 1);
		return;
	}
	rtt = ktime_sub(ktime_get(), in->ping_t0);
	size = in->ping_size;
	spin_unlock(&in->ping_lock);
	ok = len == size;
	for (i = 0; i < n && ok; i++) {
		const struct lu2k_extent *e = &in->rx_ext[i];

		ok = pat_check(seq, at, rx_pool(in, e->offset), e->len);
		at += e->len;
	}
	/* The ping may have timed out and the next one begun while the payload was checked. */
	spin_lock(&in->ping_lock);
	if (!in->ping_waiting || seq != in->ping_seq) {
		spin_unlock(&in->ping_lock);
		st_add(in, ST_REPLIES_UNMATCHED, 1);
		return;
	}
	in->ping_rtt = rtt;
	in->ping_corrupt = !ok;
	in->ping_got = true;
	in->ping_waiting = false;
	spin_unlock(&in->ping_lock);
	wake_up(&in->ping_wq);
}

/* One RX descriptor copied out of the ring: validated, delivered, its token returned. */
static void rx_one(struct lu2k_core *c, const struct lu2k_rx_desc *d)
{
	struct lu2k_inst *in = c->inst;

	if (rx_validate(in, d)) {
		st_add(in, ST_BAD_RX, 1);
	} else {
		st_add(in, ST_RX_MSGS, 1);
		st_add(in, ST_RX_BYTES, d->total_len);
		down_read(&in->client_sem);
		if (in->client) {
			in->client->rx(in->client_priv, d->hdr, in->rx_ext, d->nfrags,
				       d->total_len);
			up_read(&in->client_sem);
			goto ret;
		}
		up_read(&in->client_sem);
		switch (get_unaligned_le32(d->hdr + H_TYPE)) {
		case LNET_MSG_PUT:
			rx_put(in, d->nfrags, d->hdr, d->total_len);
			break;
		case LNET_MSG_GET:
			rx_get(in, d->hdr, &d->src_nid);
			break;
		case LNET_MSG_REPLY:
			rx_reply(in, d->nfrags, d->hdr, d->total_len);
			break;
		}
	}
ret:
	/* The token is the engine's; it checks what comes back. */
	c->rxr[c->rxr_prod & (c->rxr_n - 1)].token = d->token;
	c->rxr_prod++;
}

/* ---- the consumer kthread ------------------------------------------------------- */

/* Entries waiting in a ring the engine produces; 0 when none or the index is out of range. */
static u32 waiting(struct lu2k_inst *in, u32 *prod_word, u32 cons, u32 n, bool count)
{
	/* Acquire, pairing with the engine's release: the slots below the index are written. */
	u32 used = smp_load_acquire(prod_word) - cons;

	if (used > n) {
		if (count)
			st_add(in, ST_BAD_INDEX, 1);
		return 0;
	}
	return used;
}

static u32 rxr_room(struct lu2k_core *c, bool count)
{
	/* Acquire: the engine's reads of returns are done before it moved this index. */
	u32 used = c->rxr_prod - smp_load_acquire(&c->cb->rx_return_cons.value);

	if (used > c->rxr_n) {
		if (count)
			st_add(c->inst, ST_BAD_INDEX, 1);
		return 0;
	}
	return c->rxr_n - used;
}

static bool core_has_work(struct lu2k_core *c)
{
	return waiting(c->inst, &c->cb->tx_done_prod.value, c->txd_cons, c->txd_n, false) ||
	       (waiting(c->inst, &c->cb->rx_prod.value, c->rx_cons, c->rx_n, false) &&
		rxr_room(c, false));
}

static u32 core_poll(struct lu2k_core *c)
{
	struct lu2k_inst *in = c->inst;
	struct lu2k_tx_completion cp;
	struct lu2k_rx_desc d;
	u32 n, done = 0, room, rx = 0;

	n = waiting(in, &c->cb->tx_done_prod.value, c->txd_cons, c->txd_n, true);
	while (n--) {
		memcpy(&cp, &c->txd[c->txd_cons & (c->txd_n - 1)], sizeof(cp));
		/* The copy is read from here on, never the slot again. */
		barrier();
		c->txd_cons++;
		tx_complete(c, &cp);
		done++;
		cond_resched();
	}
	if (done) {
		/* Release: the completions are copied before the engine may reuse their slots. */
		smp_store_release(&c->cb->tx_done_cons.value, c->txd_cons);
	}

	n = waiting(in, &c->cb->rx_prod.value, c->rx_cons, c->rx_n, true);
	room = rxr_room(c, true);
	n = min(n, room);
	while (n--) {
		memcpy(&d, &c->rx[c->rx_cons & (c->rx_n - 1)], sizeof(d));
		/* The copy is read from here on, never the slot again. */
		barrier();
		c->rx_cons++;
		rx_one(c, &d);
		rx++;
		/* A descriptor may cost a 1 MiB pattern check; batches reach 2^20. */
		cond_resched();
	}
	if (rx) {
		/* Release: the slots are read before the engine may reuse them. */
		smp_store_release(&c->cb->rx_cons.value, c->rx_cons);
		/* Release: the returns are written before the engine reads them. */
		smp_store_release(&c->cb->rx_return_prod.value, c->rxr_prod);
		ring_engine(c);
	}
	return done + rx;
}

/*
 * RX waiting while the return ring is full: the engine rings no doorbell when it takes
 * returns, so only polling sees the room come back.
 */
static bool core_rx_blocked(struct lu2k_core *c)
{
	return waiting(c->inst, &c->cb->rx_prod.value, c->rx_cons, c->rx_n, false) &&
	       !rxr_room(c, false);
}

static bool kicked_or_stop(struct lu2k_inst *in)
{
	return atomic_xchg(&in->kick, 0) || kthread_should_stop();
}

static int lu2k_consumer(void *arg)
{
	struct lu2k_inst *in = arg;
	u32 i, work;
	bool any, blocked;
	long left;

	while (!kthread_should_stop()) {
		work = 0;
		for (i = 0; i < in->cores; i++)
			work += core_poll(&in->core[i]);
		if (work) {
			cond_resched();
			continue;
		}
		for (i = 0; i < in->cores; i++)
			WRITE_ONCE(in->core[i].cb->to_kshim_need_wakeup.value, LU2K_WAKE_EVENTFD);
		/* Pairs with the engine's barrier between its index store and its wakeup read. */
		smp_mb();
		any = false;
		blocked = false;
		for (i = 0; i < in->cores; i++) {
			any |= core_has_work(&in->core[i]);
			blocked |= core_rx_blocked(&in->core[i]);
		}
		if (!any) {
			/* Blocked on return room: a tick, not a second, until RX moves again. */
			left = wait_event_interruptible_timeout(in->consumer_wq,
								kicked_or_stop(in),
								blocked ? 1 : HZ);
			if (!left && !blocked) {
				for (i = 0; i < in->cores; i++)
					if (core_has_work(&in->core[i]))
						st_add(in, ST_IDLE_TIMEOUTS_WITH_WORK, 1);
			}
		}
		for (i = 0; i < in->cores; i++)
			WRITE_ONCE(in->core[i].cb->to_kshim_need_wakeup.value, 0);
	}
	return 0;
}

/* ---- attach and detach ----------------------------------------------------------- */

static int lu2k_kick_wake(wait_queue_entry_t *w, unsigned int mode, int sync, void *key)
{
	struct lu2k_core *c = container_of(w, struct lu2k_core, kick_wait);
	u64 cnt;

	if (key_to_poll(key) & EPOLLIN) {
		/* Called under the eventfd's wait-queue lock, as eventfd_ctx_do_read needs. */
		eventfd_ctx_do_read(c->to_kshim, &cnt);
		st_add(c->inst, ST_WAKEUPS, 1);
		atomic_set(&c->inst->kick, 1);
		wake_up_interruptible(&c->inst->consumer_wq);
	}
	return 0;
}

static void lu2k_kick_queue(struct file *f, wait_queue_head_t *wqh, poll_table *pt)
{
	struct lu2k_core *c = container_of(pt, struct lu2k_core, kick_pt);

	add_wait_queue(wqh, &c->kick_wait);
	c->kick_hooked = true;
}

static void core_unhook(struct lu2k_core *c)
{
	u64 cnt;

	if (c->kick_hooked)
		eventfd_ctx_remove_wait_queue(c->to_kshim, &c->kick_wait, &cnt);
	c->kick_hooked = false;
	if (c->to_kshim)
		eventfd_ctx_put(c->to_kshim);
	c->to_kshim = NULL;
	if (c->kick_file)
		fput(c->kick_file);
	c->kick_file = NULL;
	spin_lock(&c->tx_lock);
	if (c->to_engine)
		eventfd_ctx_put(c->to_engine);
	c->to_engine = NULL;
	spin_unlock(&c->tx_lock);
}

static int core_hook(struct lu2k_core *c, int to_engine, int to_kshim)
{
	struct eventfd_ctx *e = eventfd_ctx_fdget(to_engine);
	struct file *f;

	if (IS_ERR(e))
		return PTR_ERR(e);
	spin_lock(&c->tx_lock);
	c->to_engine = e;
	spin_unlock(&c->tx_lock);
	f = fget(to_kshim);
	if (!f)
		return -EBADF;
	c->kick_file = f;
	c->to_kshim = eventfd_ctx_fileget(f);
	if (IS_ERR(c->to_kshim)) {
		int err = PTR_ERR(c->to_kshim);

		c->to_kshim = NULL;
		return err;
	}
	init_waitqueue_func_entry(&c->kick_wait, lu2k_kick_wake);
	init_poll_funcptr(&c->kick_pt, lu2k_kick_queue);
	vfs_poll(f, &c->kick_pt);
	return 0;
}

/* Detaches the engine: no new sends, consumer stopped, in-flight failed back, rings reset. */
static void inst_detach(struct lu2k_inst *in)
{
	u32 i;

	mutex_lock(&in->lock);
	for (i = 0; i < in->cores; i++) {
		spin_lock(&in->core[i].tx_lock);
		in->core[i].live = false;
		spin_unlock(&in->core[i].tx_lock);
	}
	WRITE_ONCE(in->serving, false);
	if (in->consumer)
		kthread_stop(in->consumer);
	in->consumer = NULL;
	for (i = 0; i < in->nslots; i++) {
		bool inflight;

		spin_lock(&in->slot_lock);
		inflight = in->txs[i].state == TX_INFLIGHT;
		if (inflight)
			in->txs[i].state = TX_BUSY;
		spin_unlock(&in->slot_lock);
		if (inflight)
			tx_finish(in, i, LU2K_TX_ENGINE_GONE);
	}
	for (i = 0; i < in->cores; i++) {
		struct lu2k_core *c = &in->core[i];

		core_unhook(c);
		memset(c->cb, 0, sizeof(*c->cb));
		c->tx_prod = 0;
		c->txd_cons = 0;
		c->rx_cons = 0;
		c->rxr_prod = 0;
	}
	WRITE_ONCE(in->engine, NULL);
	st_add(in, ST_DETACHES, 1);
	mutex_unlock(&in->lock);
	wake_up_all(&in->attach_wq);
	wake_up_all(&in->slot_wq);
	pr_info("instance %u: engine detached\n", in->id);
}

static long ioc_attach(struct file *f, void __user *arg)
{
	struct lu2k_dev_attach a;
	struct lu2k_inst *in;
	u32 i;
	int err = 0;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	/*
	 * Two threads may attach one file at once: the check and the set of private_data
	 * are one step, or one attachment would be lost with its hooks and references.
	 */
	mutex_lock(&attach_lock);
	if (f->private_data) {
		err = -EBUSY;
		goto out;
	}
	in = inst_get(a.instance);
	if (!in) {
		err = -ENOENT;
		goto out;
	}
	if (a.cores != in->cores) {
		err = -EINVAL;
		goto put;
	}
	mutex_lock(&in->lock);
	if (in->engine) {
		mutex_unlock(&in->lock);
		err = -EBUSY;
		goto put;
	}
	for (i = 0; i < in->cores && !err; i++)
		err = core_hook(&in->core[i], a.to_engine[i], a.to_kshim[i]);
	if (err) {
		for (i = 0; i < in->cores; i++)
			core_unhook(&in->core[i]);
		mutex_unlock(&in->lock);
		goto put;
	}
	WRITE_ONCE(in->engine, f);
	st_add(in, ST_ATTACHES, 1);
	mutex_unlock(&in->lock);
	/* Published last: ACK, NOTICE and mmap on this file see a whole attachment. */
	smp_store_release(&f->private_data, in);
	mutex_unlock(&attach_lock);
	return 0;
put:
	inst_put(in);
out:
	mutex_unlock(&attach_lock);
	return err;
}

static long ioc_ack(struct file *f, void __user *arg)
{
	/* Pairs with ioc_attach's release: a whole attachment or none. */
	struct lu2k_inst *in = smp_load_acquire(&f->private_data);
	struct task_struct *t;
	u32 status, i;

	if (!in)
		return -ENOTCONN;
	if (get_user(status, (u32 __user *)arg))
		return -EFAULT;
	if (status) {
		pr_info_ratelimited("instance %u: the engine refused the region (status %u)\n",
				    in->id, status);
		return 0;
	}
	mutex_lock(&in->lock);
	if (in->serving) {
		mutex_unlock(&in->lock);
		return -EALREADY;
	}
	t = kthread_run(lu2k_consumer, in, "lu2k/%u", in->id);
	if (IS_ERR(t)) {
		mutex_unlock(&in->lock);
		return PTR_ERR(t);
	}
	in->consumer = t;
	for (i = 0; i < in->cores; i++) {
		spin_lock(&in->core[i].tx_lock);
		in->core[i].live = true;
		spin_unlock(&in->core[i].tx_lock);
	}
	WRITE_ONCE(in->serving, true);
	mutex_unlock(&in->lock);
	wake_up_all(&in->attach_wq);
	pr_info("instance %u: engine attached\n", in->id);
	return 0;
}

static long ioc_info(void __user *arg)
{
	struct lu2k_dev_info a;
	struct lu2k_inst *in;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	in = inst_get(a.instance);
	if (!in)
		return -ENOENT;
	a.cores = in->cores;
	a.region_size = in->size;
	a.nid_count = in->nid_count;
	a.attached = !!READ_ONCE(in->engine);
	memcpy(a.nids, in->nids, sizeof(a.nids));
	inst_put(in);
	return copy_to_user(arg, &a, sizeof(a)) ? -EFAULT : 0;
}

static long ioc_notice(struct file *f, void __user *arg)
{
	/* Pairs with ioc_attach's release: a whole attachment or none. */
	struct lu2k_inst *in = smp_load_acquire(&f->private_data);
	struct lu2k_dev_notice n;
	char nbuf[LU2K_NID_STR];

	if (!in)
		return -ENOTCONN;
	if (copy_from_user(&n, arg, sizeof(n)))
		return -EFAULT;
	if (n.kind != LU2K_NOTICE_PEER_DOWN && n.kind != LU2K_NOTICE_PEER_UP)
		return -EINVAL;
	if (!lu2k_nid_valid(&n.nid))
		return -EINVAL;
	st_add(in, ST_NOTICES, 1);
	pr_info_ratelimited("instance %u: peer %s is %s\n", in->id,
			    nid_str(&n.nid, nbuf, sizeof(nbuf)),
			    n.kind == LU2K_NOTICE_PEER_DOWN ? "down" : "up");
	return 0;
}

static long ioc_stats(void __user *arg)
{
	struct lu2k_dev_stats a;
	struct lu2k_inst *in;
	u64 *out = &a.tx_sent;
	int i;

	BUILD_BUG_ON(sizeof(a) != 8 + 8 * ST_COUNT);
	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	in = inst_get(a.instance);
	if (!in)
		return -ENOENT;
	a.attached = READ_ONCE(in->serving);
	for (i = 0; i < ST_COUNT; i++)
		out[i] = atomic64_read(&in->st[i]);
	inst_put(in);
	return copy_to_user(arg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* ---- the load generator ---------------------------------------------------------- */

/*
 * Producers wait killably: ping runs in the ioctl caller, which a fatal signal ends;
 * the PUT kthreads take no signals and end on l->abort, which wakes both queues.
 */
static bool wait_serving(struct lu2k_inst *in, struct lu2k_load *l)
{
	return wait_event_killable_timeout(in->attach_wq,
					   READ_ONCE(in->serving) || READ_ONCE(l->abort),
					   msecs_to_jiffies(l->a.timeout_ms)) > 0 &&
	       !READ_ONCE(l->abort);
}

static bool slot_or_abort(struct lu2k_inst *in, struct lu2k_load *l, int *s)
{
	*s = slot_get(in, false);
	return *s >= 0 || READ_ONCE(l->abort);
}

static int wait_slot(struct lu2k_inst *in, struct lu2k_load *l)
{
	int s = -1;

	wait_event_killable_timeout(in->slot_wq, slot_or_abort(in, l, &s),
				    msecs_to_jiffies(l->a.timeout_ms));
	return s;
}

/* A message slot for the next send, or -1 when not served, aborted or timed out. */
static int wait_send(struct lu2k_inst *in, struct lu2k_load *l)
{
	if (!wait_serving(in, l))
		return -1;
	return wait_slot(in, l);
}

static void put_hdr(u8 *h, u64 src, u64 dst, u64 seed, u32 len)
{
	memset(h, 0, LU2K_LNET_HDR_LEN);
	put_unaligned_le64(dst, h + H_DEST_NID);
	put_unaligned_le64(src, h + H_SRC_NID);
	put_unaligned_le32(LU2K_PID, h + H_DEST_PID);
	put_unaligned_le32(LU2K_PID, h + H_SRC_PID);
	put_unaligned_le32(LNET_MSG_PUT, h + H_TYPE);
	put_unaligned_le32(len, h + H_PAYLOAD_LEN);
	put_unaligned_le64(U64_MAX, h + H_WMD);
	put_unaligned_le64(U64_MAX, h + H_WMD_OBJECT);
	put_unaligned_le64(seed, h + H_MATCH_BITS);
	put_unaligned_le64(seed, h + H_PUT_HDR_DATA);
	put_unaligned_le32(LU2K_PORTAL, h + H_PUT_PTL);
}

static int lu2k_put_thread(void *arg)
{
	struct lu2k_load *l = arg;
	struct lu2k_inst *in = l->inst;
	u8 hdr[LU2K_LNET_HDR_LEN];
	int s;
	u32 i;

	while ((i = atomic_inc_return(&l->next) - 1) < l->a.count && !READ_ONCE(l->abort)) {
		u64 seed = l->a.salt + i;

		s = wait_send(in, l);
		if (s < 0) {
			atomic64_inc(&l->failed);
			continue;
		}
		pat_fill(seed, 0, pool_tx(in, s), l->a.size);
		put_hdr(hdr, lu2k_nid4(&in->nids[0]), lu2k_nid4(&l->a.peer_nid), seed, l->a.size);
		if (tx_send(in, s, hdr, &l->a.peer_nid, l->a.size, l)) {
			slot_put(in, s);
			atomic64_inc(&l->failed);
			atomic64_inc(&l->gone);
		}
	}
	if (atomic_dec_and_test(&l->running))
		wake_up(&l->wq);
	kref_put(&l->ref, load_release);
	/* The reference taken before kthread_run: rmmod waits until this thread is gone. */
	module_put_and_kthread_exit(0);
}

static int cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

static int ping_run(struct lu2k_inst *in, struct lu2k_load *l, u64 *rtt, u32 *nrtt)
{
	u8 h[LU2K_LNET_HDR_LEN];
	bool got, corrupt;
	ktime_t took;
	u32 seq;
	int s;

	for (seq = 0; seq < l->a.count; seq++) {
		if (fatal_signal_pending(current))
			return -EINTR;
		s = wait_send(in, l);
		if (s < 0) {
			atomic64_inc(&l->failed);
			continue;
		}
		memset(h, 0, sizeof(h));
		put_unaligned_le64(lu2k_nid4(&l->a.peer_nid), h + H_DEST_NID);
		put_unaligned_le64(lu2k_nid4(&in->nids[0]), h + H_SRC_NID);
		put_unaligned_le32(LU2K_PID, h + H_DEST_PID);
		put_unaligned_le32(LU2K_PID, h + H_SRC_PID);
		put_unaligned_le32(LNET_MSG_GET, h + H_TYPE);
		put_unaligned_le64(1ULL << 32, h + H_WMD);
		put_unaligned_le64(l->a.salt + seq, h + H_WMD_OBJECT);
		put_unaligned_le64(l->a.salt + seq, h + H_MATCH_BITS);
		put_unaligned_le32(LU2K_PORTAL, h + H_GET_PTL);
		put_unaligned_le32(l->a.size, h + H_GET_SINK_LEN);
		spin_lock(&in->ping_lock);
		in->ping_seq = l->a.salt + seq;
		in->ping_size = l->a.size;
		in->ping_got = false;
		in->ping_waiting = true;
		in->ping_t0 = ktime_get();
		spin_unlock(&in->ping_lock);
		if (tx_send(in, s, h, &l->a.peer_nid, 0, l)) {
			slot_put(in, s);
			atomic64_inc(&l->failed);
		} else {
			wait_event_killable_timeout(in->ping_wq, READ_ONCE(in->ping_got),
						    msecs_to_jiffies(l->a.timeout_ms));
		}
		spin_lock(&in->ping_lock);
		in->ping_waiting = false;
		got = in->ping_got;
		corrupt = in->ping_corrupt;
		took = in->ping_rtt;
		spin_unlock(&in->ping_lock);
		if (got && corrupt)
			l->a.corrupt++;
		else if (got)
			rtt[(*nrtt)++] = ktime_to_ns(took);
	}
	return 0;
}

static long ioc_load(void __user *arg)
{
	struct lu2k_dev_load a;
	struct lu2k_inst *in;
	struct lu2k_load *l;
	u64 *rtt = NULL, t0;
	u32 i, nrtt = 0;
	long err = 0, left;

	if (copy_from_user(&a, arg, sizeof(a)))
		return -EFAULT;
	if ((a.kind != LU2K_LOAD_PUT && a.kind != LU2K_LOAD_PING) || !a.count ||
	    a.count > (1u << 24) || a.size > LU2K_MAX_PAYLOAD || !a.threads || a.threads > 16 ||
	    !a.timeout_ms || a.timeout_ms > LU2K_MAX_TIMEOUT_MS ||
	    (a.kind == LU2K_LOAD_PUT && !a.size) || !lu2k_nid_valid(&a.peer_nid))
		return -EINVAL;
	in = inst_get(a.instance);
	if (!in)
		return -ENOENT;
	l = kzalloc(sizeof(*l), GFP_KERNEL);
	if (!l) {
		inst_put(in);
		return -ENOMEM;
	}
	kref_init(&l->ref);
	l->inst = in;
	l->a = a;
	init_waitqueue_head(&l->wq);
	t0 = ktime_get_ns();
	if (a.kind == LU2K_LOAD_PUT) {
		atomic_set(&l->running, a.threads);
		for (i = 0; i < a.threads; i++) {
			struct task_struct *t;

			kref_get(&l->ref);
			__module_get(THIS_MODULE);
			t = kthread_run(lu2k_put_thread, l, "lu2k-put/%u.%u", in->id, i);
			if (IS_ERR(t)) {
				module_put(THIS_MODULE);
				kref_put(&l->ref, load_release);
				if (atomic_dec_and_test(&l->running))
					wake_up(&l->wq);
			}
		}
		if (wait_event_interruptible(l->wq, !atomic_read(&l->running))) {
			WRITE_ONCE(l->abort, true);
			wake_up_all(&in->attach_wq);
			wake_up_all(&in->slot_wq);
		}
		/*
		 * Woken above, every producer sees the abort before its next wait and ends
		 * after at most the send in hand; they use in and l until then.
		 */
		wait_event(l->wq, !atomic_read(&l->running));
	} else {
		if (!mutex_trylock(&in->ping_mutex)) {
			err = -EBUSY;
			goto out;
		}
		rtt = kvcalloc(a.count, sizeof(u64), GFP_KERNEL);
		if (rtt)
			err = ping_run(in, l, rtt, &nrtt);
		else
			err = -ENOMEM;
		mutex_unlock(&in->ping_mutex);
		a.corrupt = l->a.corrupt;
		a.failed = a.count - nrtt;
	}
	/*
	 * Messages still in flight are waited for, timeout_ms at most: an engine detaching
	 * fails them back, but a peer that never answers holds them until the engine
	 * reports it down. Those still in flight keep their reference to the load.
	 */
	left = wait_event_killable_timeout(l->wq, !atomic_read(&l->inflight),
					   msecs_to_jiffies(a.timeout_ms));
	if (left < 0)
		err = -EINTR;
	else if (!left)
		err = -ETIMEDOUT;
	a.elapsed_ns = ktime_get_ns() - t0;
	if (a.kind == LU2K_LOAD_PUT) {
		a.ok = atomic64_read(&l->ok);
		a.failed = atomic64_read(&l->failed);
		a.bytes = atomic64_read(&l->bytes);
	} else if (nrtt) {
		a.ok = nrtt;
		sort(rtt, nrtt, sizeof(u64), cmp_u64, NULL);
		a.rtt_ns[0] = rtt[0];
		a.rtt_ns[1] = rtt[nrtt * 50 / 100];
		a.rtt_ns[2] = rtt[nrtt * 90 / 100];
		a.rtt_ns[3] = rtt[nrtt * 99 / 100];
		a.rtt_ns[4] = rtt[nrtt - 1];
	}
	a.engine_gone = atomic64_read(&l->gone);
	kvfree(rtt);
out:
	kref_put(&l->ref, load_release);
	inst_put(in);
	if (err)
		return err;
	return copy_to_user(arg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* ---- the device ------------------------------------------------------------------ */

/* ---- the in-kernel client interface (lu2k_kshim.h) --------------------------------- */

struct lu2k_inst *lu2k_kshim_bind(const lu2k_kshim_nid_t *nid, const struct lu2k_kshim_client *cl,
				  void *priv)
{
	struct lu2k_inst *in = NULL;
	u32 id;

	mutex_lock(&insts_lock);
	for (id = 0; id < LU2K_MAX_INSTANCES && !in; id++)
		if (insts[id] && !memcmp(&insts[id]->nids[0], nid, sizeof(*nid)))
			in = insts[id];
	if (in)
		atomic_inc(&in->users);
	mutex_unlock(&insts_lock);
	if (!in)
		return ERR_PTR(-ENOENT);
	down_write(&in->client_sem);
	if (in->client) {
		up_write(&in->client_sem);
		inst_put(in);
		return ERR_PTR(-EBUSY);
	}
	in->client_priv = priv;
	in->client = cl;
	up_write(&in->client_sem);
	pr_info("instance %u: bound to an in-kernel client\n", in->id);
	return in;
}
EXPORT_SYMBOL_GPL(lu2k_kshim_bind);

void lu2k_kshim_unbind(struct lu2k_inst *in)
{
	/* Waits for a callback under way: none runs once the write lock is taken. */
	down_write(&in->client_sem);
	in->client = NULL;
	in->client_priv = NULL;
	up_write(&in->client_sem);
	pr_info("instance %u: in-kernel client unbound\n", in->id);
	inst_put(in);
}
EXPORT_SYMBOL_GPL(lu2k_kshim_unbind);

u32 lu2k_kshim_tx_slots(struct lu2k_inst *in)
{
	return in->nslots;
}
EXPORT_SYMBOL_GPL(lu2k_kshim_tx_slots);

int lu2k_kshim_tx_get(struct lu2k_inst *in)
{
	/* A client has no selftest REPLYs to keep slots for: it may take them all. */
	int s = slot_get(in, true);

	return s < 0 ? -ENOBUFS : s;
}
EXPORT_SYMBOL_GPL(lu2k_kshim_tx_get);

u8 *lu2k_kshim_tx_buf(struct lu2k_inst *in, int slot)
{
	return pool_tx(in, slot);
}
EXPORT_SYMBOL_GPL(lu2k_kshim_tx_buf);

void lu2k_kshim_tx_abort(struct lu2k_inst *in, int slot)
{
	slot_put(in, slot);
}
EXPORT_SYMBOL_GPL(lu2k_kshim_tx_abort);

int lu2k_kshim_tx_send(struct lu2k_inst *in, int slot, const u8 *hdr,
		       const lu2k_kshim_nid_t *peer, u32 len, void *ctx)
{
	if (len > LU2K_MAX_PAYLOAD)
		return -EMSGSIZE;
	in->txs[slot].ctx = ctx;
	if (!lu2k_nid_valid(peer))
		return -EINVAL;
	return tx_send(in, slot, hdr, peer, len, NULL);
}
EXPORT_SYMBOL_GPL(lu2k_kshim_tx_send);

const u8 *lu2k_kshim_rx_buf(struct lu2k_inst *in, u64 off)
{
	return rx_pool(in, off);
}
EXPORT_SYMBOL_GPL(lu2k_kshim_rx_buf);

static int lu2k_open(struct inode *inode, struct file *f)
{
	f->private_data = NULL;
	return 0;
}

static int lu2k_release(struct inode *inode, struct file *f)
{
	struct lu2k_inst *in = f->private_data;

	if (in) {
		inst_detach(in);
		inst_put(in);
	}
	return 0;
}

static int lu2k_mmap(struct file *f, struct vm_area_struct *vma)
{
	/* Pairs with ioc_attach's release: a whole attachment or none. */
	struct lu2k_inst *in = smp_load_acquire(&f->private_data);

	if (!in)
		return -ENOTCONN;
	/* The rings are shared or they are nothing; a forked child does not serve them. */
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, VM_DONTCOPY);
#else
	vma->vm_flags |= VM_DONTCOPY;
#endif
	/* Any page range inside the region: the engine maps its TX pool a second time. */
	if (vma->vm_pgoff >= in->size >> PAGE_SHIFT ||
	    vma->vm_end - vma->vm_start > in->size - (vma->vm_pgoff << PAGE_SHIFT))
		return -EINVAL;
	return remap_vmalloc_range(vma, in->region, vma->vm_pgoff);
}

static __poll_t lu2k_poll(struct file *f, poll_table *pt)
{
	/* Nothing to read: an attached engine learns of nothing through poll. */
	return 0;
}

static long lu2k_ioctl(struct file *f, unsigned int cmd, unsigned long arg)
{
	void __user *p = (void __user *)arg;

	switch (cmd) {
	case LU2K_IOC_CREATE:
		return capable(CAP_SYS_ADMIN) ? ioc_create(p) : -EPERM;
	case LU2K_IOC_DESTROY:
		return capable(CAP_SYS_ADMIN) ? ioc_destroy(p) : -EPERM;
	case LU2K_IOC_INFO:
		return ioc_info(p);
	case LU2K_IOC_ATTACH:
		return ioc_attach(f, p);
	case LU2K_IOC_ACK:
		return ioc_ack(f, p);
	case LU2K_IOC_NOTICE:
		return ioc_notice(f, p);
	case LU2K_IOC_LOAD:
		return capable(CAP_SYS_ADMIN) ? ioc_load(p) : -EPERM;
	case LU2K_IOC_STATS:
		return ioc_stats(p);
	}
	return -ENOTTY;
}

static const struct file_operations lu2k_fops = {
	.owner = THIS_MODULE,
	.open = lu2k_open,
	.release = lu2k_release,
	.mmap = lu2k_mmap,
	.poll = lu2k_poll,
	.unlocked_ioctl = lu2k_ioctl,
	/* Every record has one layout on i386 and x86-64 (lu2k_ring.h). */
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice lu2k_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "lu2k",
	.fops = &lu2k_fops,
	.mode = 0600,
};

static int __init lu2k_init(void)
{
	BUILD_BUG_ON(sizeof(struct lu2k_region_header) != 256);
	BUILD_BUG_ON(sizeof(struct lu2k_core_entry) != 96);
	BUILD_BUG_ON(sizeof(struct lu2k_control_block) != 768);
	BUILD_BUG_ON(sizeof(struct lu2k_tx_desc) != 192);
	BUILD_BUG_ON(sizeof(struct lu2k_rx_desc) != 192);
	BUILD_BUG_ON(sizeof(struct lu2k_nid) != 24);
	BUILD_BUG_ON(sizeof(struct lu2k_tx_completion) != 16);
	BUILD_BUG_ON(sizeof(struct lu2k_rx_return) != 8);
	return misc_register(&lu2k_misc);
}

static void __exit lu2k_exit(void)
{
	u32 i;

	misc_deregister(&lu2k_misc);
	/* No file is open (each holds a module reference): no engine, no load. */
	for (i = 0; i < LU2K_MAX_INSTANCES; i++)
		if (insts[i])
			inst_free(insts[i]);
}

module_init(lu2k_init);
module_exit(lu2k_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("lu2k kernel half: the shared ring ABI served through /dev/lu2k");
