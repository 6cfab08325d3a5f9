/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * lu2k_ring.h - the lu2k shared-region ABI, for a kernel implementation.
 *
 * Mirrors the Rust crate lu2k-ring-abi (ring-abi/src/layout.rs, desc.rs). A test
 * (ring-abi/tests/layout.rs) compiles a C program against this header and checks every
 * size and offset against the Rust types. All offsets are from the start of the region;
 * there are no pointers. Little-endian, naturally aligned, fixed-width fields.
 *
 * Rings: single producer, single consumer; power-of-two entries; free-running u32
 * indices (slot = index & (entries - 1)); used = prod - cons (mod 2^32).
 * Producer: write slots, smp_store_release(prod); consumer: smp_load_acquire(prod), read
 * slots (copy the slot once, validate the copy), smp_store_release(cons).
 *
 * Doorbells: after publishing, the producer does smp_mb() then reads the consumer's
 * need_wakeup word; if LU2K_WAKE_EVENTFD is set it signals the direction's eventfd (if
 * LU2K_WAKE_FUTEX is set, a userspace producer increments the futex word and FUTEX_WAKEs
 * it). A consumer that found its rings empty sets need_wakeup, smp_mb(), re-checks its
 * rings and sleeps only if still empty, then clears need_wakeup.
 */
#ifndef LU2K_RING_H
#define LU2K_RING_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
typedef __u8 lu2k_u8;
typedef __u16 lu2k_u16;
typedef __u32 lu2k_u32;
typedef __u64 lu2k_u64;
typedef __s32 lu2k_s32;
#else
#include <stdint.h>
#include <linux/ioctl.h>
typedef uint8_t lu2k_u8;
typedef uint16_t lu2k_u16;
typedef uint32_t lu2k_u32;
typedef uint64_t lu2k_u64;
typedef int32_t lu2k_s32;
#endif

#define LU2K_MAGIC 0x474e49524b32554cULL /* "LU2KRING" little-endian */
#define LU2K_VERSION_MAJOR 2
#define LU2K_VERSION_MINOR 1
#define LU2K_CACHE_LINE 64
#define LU2K_PAGE 4096
#define LU2K_MAX_CORES 256
#define LU2K_MAX_RING_ENTRIES (1u << 20)
#define LU2K_MAX_PAYLOAD (1u << 20)
#define LU2K_MAX_TX_EXTENTS 256
#define LU2K_MAX_RX_EXTENTS 1024
#define LU2K_INLINE_EXTENTS 2
#define LU2K_RX_TABLE_BYTES (LU2K_MAX_RX_EXTENTS * 16)
#define LU2K_LNET_HDR_LEN 72

/* Feature bits (lu2k_region_header.features). Unknown bits make a mapper refuse. */
#define LU2K_FEAT_FUTEX_WAKE (1ULL << 0)
#define LU2K_FEAT_RX_INDIRECT (1ULL << 1)

/* Pools (lu2k_extent.pool). */
#define LU2K_POOL_TX 0
#define LU2K_POOL_RX 1
#define LU2K_POOL_RX_TABLES 2

/* Descriptor flags. INDIRECT: ext[0] describes a table of nfrags extents. */
#define LU2K_TX_INDIRECT (1u << 0)
#define LU2K_RX_INDIRECT (1u << 0)

/* Need-wakeup bits. */
#define LU2K_WAKE_EVENTFD (1u << 0)
#define LU2K_WAKE_FUTEX (1u << 1)

/* TX completion status. */
enum lu2k_tx_status {
	LU2K_TX_OK = 0,
	LU2K_TX_PEER_UNREACHABLE = 1,
	LU2K_TX_TIMED_OUT = 2,
	LU2K_TX_ABORTED = 3,
	LU2K_TX_INVALID_DESCRIPTOR = 4,
	LU2K_TX_NO_RESOURCES = 5,
	LU2K_TX_ENGINE_GONE = 6,
	LU2K_TX_PEER_RESET = 7,
	LU2K_TX_SHUTDOWN = 8,
};

struct lu2k_region_header {
	lu2k_u64 magic;
	lu2k_u16 version_major;
	lu2k_u16 version_minor;
	lu2k_u32 header_size;
	lu2k_u64 total_size;
	lu2k_u64 features;
	lu2k_u32 cores;
	lu2k_u32 core_entry_size;
	lu2k_u64 core_table_off;
	lu2k_u64 tx_pool_off;
	lu2k_u64 tx_pool_len;
	lu2k_u64 rx_pool_off;
	lu2k_u64 rx_pool_len;
	lu2k_u32 rx_buf_size;
	lu2k_u32 rx_buf_count;
	lu2k_u64 rx_tables_off;
	lu2k_u64 rx_tables_len;
	lu2k_u32 conns_per_peer;     /* cores per peer, see lu2k_stripe(); 0 means 1 */
	lu2k_u32 reserved0;
	lu2k_u64 reserved[18];
};

struct lu2k_ring_info {
	lu2k_u64 off;
	lu2k_u32 entries;
	lu2k_u32 slot_size;
};

struct lu2k_core_entry {
	lu2k_u64 ctrl_off;
	lu2k_u64 rx_tables_off;
	lu2k_u32 rx_tables;
	lu2k_u32 reserved0;
	lu2k_u64 reserved1;
	struct lu2k_ring_info tx;
	struct lu2k_ring_info tx_done;
	struct lu2k_ring_info rx;
	struct lu2k_ring_info rx_return;
};

struct lu2k_index_line {
	lu2k_u32 value;
	lu2k_u32 pad[15];
} __attribute__((aligned(64)));

/* Per core; the comment says who writes each word. */
struct lu2k_control_block {
	struct lu2k_index_line tx_prod;               /* kshim */
	struct lu2k_index_line tx_cons;               /* engine */
	struct lu2k_index_line tx_done_prod;          /* engine */
	struct lu2k_index_line tx_done_cons;          /* kshim */
	struct lu2k_index_line rx_prod;               /* engine */
	struct lu2k_index_line rx_cons;               /* kshim */
	struct lu2k_index_line rx_return_prod;        /* kshim */
	struct lu2k_index_line rx_return_cons;        /* engine */
	struct lu2k_index_line to_engine_need_wakeup; /* engine */
	struct lu2k_index_line to_engine_futex;       /* kshim */
	struct lu2k_index_line to_kshim_need_wakeup;  /* kshim */
	struct lu2k_index_line to_kshim_futex;        /* engine */
};

/*
 * A NID: Lustre's large NID (struct lnet_nid, Lustre 2.16+) with a 16-bit LND type so
 * lu2k's own type (0x4C32) fits. addr holds the address in network byte order, exactly
 * as lnet_nid.nid_addr: a 4-byte address (IPv4, or a number such as 0@lo) in
 * addr[0..4] with the rest 0 and size 0; an IPv6 address in all 16 bytes with size 12.
 * Reserved bytes are 0. A consumer refuses any other size or non-zero reserved bytes.
 */
#define LU2K_NID_SIZE4 0
#define LU2K_NID_SIZE16 12
#define LU2K_LND_LU2K 0x4C32

struct lu2k_nid {
	lu2k_u8 size;       /* address bytes - 4 */
	lu2k_u8 reserved0;
	lu2k_u16 lnd;       /* LND type */
	lu2k_u16 num;       /* network number */
	lu2k_u16 reserved1;
	lu2k_u8 addr[16];   /* network byte order */
};

struct lu2k_extent {
	lu2k_u16 pool;
	lu2k_u16 flags; /* reserved, 0 */
	lu2k_u32 len;
	lu2k_u64 offset; /* from the start of the pool */
};

struct lu2k_tx_desc {
	lu2k_u64 cookie;
	struct lu2k_nid peer_nid;
	lu2k_u8 hdr[LU2K_LNET_HDR_LEN];
	lu2k_u16 flags;
	lu2k_u16 nfrags;
	lu2k_u32 total_len;
	struct lu2k_extent ext[LU2K_INLINE_EXTENTS];
	lu2k_u64 reserved[6]; /* 0; rounds the descriptor to 192 bytes */
} __attribute__((aligned(64)));

struct lu2k_rx_desc {
	lu2k_u64 token;
	struct lu2k_nid src_nid;
	lu2k_u8 hdr[LU2K_LNET_HDR_LEN];
	lu2k_u16 flags;
	lu2k_u16 nfrags;
	lu2k_u32 total_len;
	struct lu2k_extent ext[LU2K_INLINE_EXTENTS];
	lu2k_u64 reserved[6]; /* 0; rounds the descriptor to 192 bytes */
} __attribute__((aligned(64)));

struct lu2k_tx_completion {
	lu2k_u64 cookie;
	lu2k_u32 status; /* enum lu2k_tx_status */
	lu2k_u32 detail; /* INVALID_DESCRIPTOR: the validation error code */
};

struct lu2k_rx_return {
	lu2k_u64 token;
};

/* LND types whose addresses are IP addresses (tcp, o2ib, gip, lu2k): only they take IPv6. */
static inline int lu2k_lnd_is_ip(lu2k_u16 lnd)
{
	return lnd == 2 || lnd == 5 || lnd == 14 || lnd == LU2K_LND_LU2K;
}

/*
 * 1 if the ABI allows nid: size 0 with nothing past the 4-byte address, or size 12 on
 * an IP network; reserved bytes 0. Consumers check every NID they are handed.
 */
static inline int lu2k_nid_valid(const struct lu2k_nid *nid)
{
	int i;

	if (nid->reserved0 || nid->reserved1)
		return 0;
	if (nid->size == LU2K_NID_SIZE16)
		return lu2k_lnd_is_ip(nid->lnd);
	if (nid->size != LU2K_NID_SIZE4)
		return 0;
	for (i = 4; i < 16; i++)
		if (nid->addr[i])
			return 0;
	return 1;
}

/* Address word i (0..3) of a NID as a host-order integer. */
static inline lu2k_u32 lu2k_nid_word(const struct lu2k_nid *nid, int i)
{
	const lu2k_u8 *a = &nid->addr[4 * i];

	return ((lu2k_u32)a[0] << 24) | ((lu2k_u32)a[1] << 16) |
	       ((lu2k_u32)a[2] << 8) | (lu2k_u32)a[3];
}

/*
 * The shard key: a 4-byte address as a host-order integer; an IPv6 address folded to
 * the XOR of its four big-endian words.
 */
static inline lu2k_u32 lu2k_nid_shard_key(const struct lu2k_nid *nid)
{
	if (nid->size == LU2K_NID_SIZE16)
		return lu2k_nid_word(nid, 0) ^ lu2k_nid_word(nid, 1) ^
		       lu2k_nid_word(nid, 2) ^ lu2k_nid_word(nid, 3);
	return lu2k_nid_word(nid, 0);
}

/*
 * LNet's 64-bit NID (net << 32 | addr, net = type << 16 | num), which the 72-byte LNet
 * header carries; an IPv6 NID has none and gives LNET_NID_ANY (all ones).
 */
static inline lu2k_u64 lu2k_nid4(const struct lu2k_nid *nid)
{
	if (nid->size != LU2K_NID_SIZE4)
		return ~(lu2k_u64)0;
	return ((lu2k_u64)((lu2k_u32)nid->lnd << 16 | nid->num) << 32) | lu2k_nid_word(nid, 0);
}

static inline lu2k_u32 lu2k_shard_key(lu2k_u32 key, lu2k_u32 cores)
{
	if (cores == 0)
		cores = 1;
	return ((lu2k_u32)(key * 0x9E3779B1u) >> 16) % cores;
}

/* shard(): the core that owns a peer. */
static inline lu2k_u32 lu2k_shard(const struct lu2k_nid *nid, lu2k_u32 cores)
{
	return lu2k_shard_key(lu2k_nid_shard_key(nid), cores);
}

/*
 * stripe(): the core that carries message `cookie` to a peer whose shard is `home`
 * when each peer is spread over conns_per_peer cores (ring-abi's `stripe`):
 * n = min(max(conns_per_peer, 1), cores), k = cookie folded to 32 bits,
 * (home + ((k * 0x9E3779B1) >> 16) % n) % cores.
 */
static inline lu2k_u32 lu2k_stripe(lu2k_u32 home, lu2k_u32 cores, lu2k_u32 conns_per_peer,
				   lu2k_u64 cookie)
{
	lu2k_u32 k = (lu2k_u32)(cookie ^ (cookie >> 32));
	lu2k_u32 n = conns_per_peer ? conns_per_peer : 1;

	if (cores == 0)
		cores = 1;
	if (n > cores)
		n = cores;
	return (home % cores + ((lu2k_u32)(k * 0x9E3779B1u) >> 16) % n) % cores;
}

/*
 * /dev/lu2k: the kernel module's device (kshim/module). The Rust side is
 * ring-abi/src/attach.rs (`device:` endpoints); the ioctl numbers are
 * _IOC(dir, LU2K_IOC_TYPE, nr, sizeof(struct)) as <linux/ioctl.h> builds them.
 *
 * An instance (one region, its NIDs and cores) is made with LU2K_IOC_CREATE and lives
 * until LU2K_IOC_DESTROY or rmmod. An engine opens the device, reads the instance with
 * LU2K_IOC_INFO, makes two eventfds per core and passes them with LU2K_IOC_ATTACH,
 * mmaps region_size bytes at offset 0, then LU2K_IOC_ACK (0 = serving). Closing the
 * last reference to that file (the fd and the mapping) detaches: in-flight messages
 * fail back with LU2K_TX_ENGINE_GONE and the rings are reset for the next engine.
 * Doorbell to the module: the module hooks the wait queue of each to_kshim eventfd,
 * so an engine rings it as it rings userspace kshim (eventfd write). The module
 * never sets LU2K_FEAT_FUTEX_WAKE.
 */
#define LU2K_IOC_TYPE 0xB2
#define LU2K_DEV_MAX_NIDS 8
#define LU2K_DEV_MAX_CORES 16

struct lu2k_dev_create {
	lu2k_u32 cores;              /* ring sets, 1..LU2K_DEV_MAX_CORES */
	lu2k_u32 nid_count;          /* 1..LU2K_DEV_MAX_NIDS */
	struct lu2k_nid nids[LU2K_DEV_MAX_NIDS];
	lu2k_u32 ring_entries;       /* entries of every ring, power of two */
	lu2k_u32 tx_slots;           /* TX pool: slots of LU2K_MAX_PAYLOAD bytes */
	lu2k_u32 rx_buf_size;        /* multiple of 64 */
	lu2k_u32 rx_buf_count;
	lu2k_u32 rx_tables_per_core;
	lu2k_u32 instance;           /* out */
	lu2k_u64 region_size;        /* out */
	lu2k_u32 conns_per_peer;     /* 0..cores, 0 means 1: see lu2k_stripe() */
	lu2k_u32 reserved;           /* 0 */
};

struct lu2k_dev_info {
	lu2k_u32 instance;           /* in */
	lu2k_u32 cores;              /* out, and the rest */
	lu2k_u64 region_size;
	lu2k_u32 nid_count;
	lu2k_u32 attached;           /* 1 while an engine is attached */
	struct lu2k_nid nids[LU2K_DEV_MAX_NIDS];
};

struct lu2k_dev_attach {
	lu2k_u32 instance;
	lu2k_u32 cores;              /* must equal the instance's */
	lu2k_s32 to_engine[LU2K_DEV_MAX_CORES]; /* eventfds the module signals */
	lu2k_s32 to_kshim[LU2K_DEV_MAX_CORES];  /* eventfds the engine signals */
};

#define LU2K_NOTICE_PEER_DOWN 1
#define LU2K_NOTICE_PEER_UP 2

struct lu2k_dev_notice {
	lu2k_u32 kind;
	lu2k_u32 reserved;
	struct lu2k_nid nid;
};

#define LU2K_LOAD_PUT 1  /* PUTs of `size` bytes, selftest pattern seeded salt + i */
#define LU2K_LOAD_PING 2 /* GETs of `size` bytes, one at a time; the peer REPLYs */

struct lu2k_dev_load {
	lu2k_u32 instance;
	lu2k_u32 kind;
	struct lu2k_nid peer_nid;
	lu2k_u64 salt;
	lu2k_u32 count;
	lu2k_u32 size;
	lu2k_u32 threads;            /* PUT: producer kthreads, 1..16 */
	lu2k_u32 timeout_ms;         /* per message: engine, TX slot or REPLY wait */
	/* out */
	lu2k_u64 ok;
	lu2k_u64 failed;
	lu2k_u64 engine_gone;
	lu2k_u64 bytes;
	lu2k_u64 elapsed_ns;
	lu2k_u64 rtt_ns[5];          /* PING: min, p50, p90, p99, max */
	lu2k_u64 corrupt;            /* PING: REPLYs whose payload failed the check */
};

struct lu2k_dev_stats {
	lu2k_u32 instance;           /* in */
	lu2k_u32 attached;
	lu2k_u64 tx_sent;
	lu2k_u64 tx_ok;
	lu2k_u64 tx_failed;          /* completed with a status other than OK */
	lu2k_u64 tx_engine_gone;     /* failed back when the engine detached */
	lu2k_u64 bad_completions;    /* refused: unknown cookie, bad status */
	lu2k_u64 bad_rx;             /* refused RX descriptors */
	lu2k_u64 bad_index;          /* ring indices the engine wrote out of range */
	lu2k_u64 rx_msgs;
	lu2k_u64 rx_bytes;
	lu2k_u64 puts_verified;
	lu2k_u64 puts_corrupt;
	lu2k_u64 gets_answered;
	lu2k_u64 replies_failed;
	lu2k_u64 replies_unmatched;
	lu2k_u64 notices;
	lu2k_u64 attaches;
	lu2k_u64 detaches;
	lu2k_u64 doorbells;          /* to-engine eventfd signals */
	lu2k_u64 wakeups;            /* to-kshim doorbells seen */
	lu2k_u64 idle_timeouts_with_work; /* a 1 s sleep ended by time with work waiting */
};

#define LU2K_IOC_CREATE _IOWR(LU2K_IOC_TYPE, 1, struct lu2k_dev_create)
#define LU2K_IOC_INFO _IOWR(LU2K_IOC_TYPE, 2, struct lu2k_dev_info)
#define LU2K_IOC_ATTACH _IOW(LU2K_IOC_TYPE, 3, struct lu2k_dev_attach)
#define LU2K_IOC_ACK _IOW(LU2K_IOC_TYPE, 4, lu2k_u32)
#define LU2K_IOC_NOTICE _IOW(LU2K_IOC_TYPE, 5, struct lu2k_dev_notice)
#define LU2K_IOC_LOAD _IOWR(LU2K_IOC_TYPE, 6, struct lu2k_dev_load)
#define LU2K_IOC_STATS _IOWR(LU2K_IOC_TYPE, 7, struct lu2k_dev_stats)
#define LU2K_IOC_DESTROY _IOW(LU2K_IOC_TYPE, 8, lu2k_u32)

#endif /* LU2K_RING_H */
