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
typedef __u8 lu2k_u8;
typedef __u16 lu2k_u16;
typedef __u32 lu2k_u32;
typedef __u64 lu2k_u64;
#else
#include <stdint.h>
typedef uint8_t lu2k_u8;
typedef uint16_t lu2k_u16;
typedef uint32_t lu2k_u32;
typedef uint64_t lu2k_u64;
#endif

#define LU2K_MAGIC 0x474e49524b32554cULL /* "LU2KRING" little-endian */
#define LU2K_VERSION_MAJOR 1
#define LU2K_VERSION_MINOR 0
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
	lu2k_u64 reserved[19];
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

struct lu2k_extent {
	lu2k_u16 pool;
	lu2k_u16 flags; /* reserved, 0 */
	lu2k_u32 len;
	lu2k_u64 offset; /* from the start of the pool */
};

struct lu2k_tx_desc {
	lu2k_u64 cookie;
	lu2k_u64 peer_nid;
	lu2k_u8 hdr[LU2K_LNET_HDR_LEN];
	lu2k_u16 flags;
	lu2k_u16 nfrags;
	lu2k_u32 total_len;
	struct lu2k_extent ext[LU2K_INLINE_EXTENTS];
} __attribute__((aligned(64)));

struct lu2k_rx_desc {
	lu2k_u64 token;
	lu2k_u64 src_nid;
	lu2k_u8 hdr[LU2K_LNET_HDR_LEN];
	lu2k_u16 flags;
	lu2k_u16 nfrags;
	lu2k_u32 total_len;
	struct lu2k_extent ext[LU2K_INLINE_EXTENTS];
} __attribute__((aligned(64)));

struct lu2k_tx_completion {
	lu2k_u64 cookie;
	lu2k_u32 status; /* enum lu2k_tx_status */
	lu2k_u32 detail; /* INVALID_DESCRIPTOR: the validation error code */
};

struct lu2k_rx_return {
	lu2k_u64 token;
};

/* shard(): the core that owns a peer; addr = low 32 bits of the NID. */
static inline lu2k_u32 lu2k_shard(lu2k_u64 nid, lu2k_u32 cores)
{
	lu2k_u32 addr = (lu2k_u32)nid;
	if (cores == 0)
		cores = 1;
	return ((lu2k_u32)(addr * 0x9E3779B1u) >> 16) % cores;
}

#endif /* LU2K_RING_H */
