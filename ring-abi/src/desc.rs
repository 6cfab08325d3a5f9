//! Descriptors: the fixed-size records that travel through the rings, and their validation.
//!
//! | record | bytes | ring | producer → consumer |
//! |---|---|---|---|
//! | [`TxDesc`] | 192 | TX | kshim → engine |
//! | [`TxCompletion`] | 16 | TX completion | engine → kshim |
//! | [`RxDesc`] | 192 | RX | engine → kshim |
//! | [`RxReturn`] | 8 | RX return | kshim → engine |
//!
//! Payload is described by [`Extent`]s `(pool, offset, length)`, offsets relative to the
//! pool's start. A descriptor carries up to [`INLINE_EXTENTS`] extents inline; with the
//! `INDIRECT` flag, `ext[0]` instead describes an extent table (an array of `nfrags`
//! extents, `ext[0].len == nfrags * 16`) which lives in the TX pool (TX, written by kshim)
//! or in the RX table area (RX, written by the engine), and `ext[1]` is ignored.
//!
//! # Validation and TOCTOU
//!
//! A consumer never trusts a descriptor. [`crate::ring::Consumer::read`] copies the slot
//! out of shared memory by value (one volatile read); validation runs on that private
//! copy. An indirect table is likewise copied, once, into the consumer's private
//! [`ExtentBuf`] before any extent is checked. Everything the consumer uses afterwards
//! (the [`ValidTx`]/[`ValidRx`] and their extent slices) is private memory, so a writer
//! that rewrites the slot or the table after the check cannot change what was checked.
//! The payload bytes themselves stay in shared memory; they are plain bytes (every value
//! is valid), and a writer that changes them while they are in flight only corrupts its
//! own message.
//!
//! A validated extent lies inside its pool: `offset + len <= pool length`, computed without
//! overflow. A bad TX descriptor is answered with a [`TxCompletion`] whose status is
//! [`TxStatus::InvalidDescriptor`] and whose `detail` is [`DescError::code`].

use bitflags::bitflags;

use crate::layout::{Layout, INLINE_EXTENTS, MAX_PAYLOAD, MAX_RX_EXTENTS, MAX_TX_EXTENTS};
use crate::nid::{Nid, NidError};

/// Bytes of an LNet wire header.
pub const LNET_HDR_LEN: usize = 72;

/// The pools an extent can name.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pool {
    /// TX payload pool (kshim writes).
    Tx = 0,
    /// RX payload pool (engine writes).
    Rx = 1,
    /// RX indirect extent tables (engine writes).
    RxTables = 2,
}

impl Pool {
    /// The pool with raw id `id`.
    pub const fn from_raw(id: u16) -> Option<Pool> {
        match id {
            0 => Some(Pool::Tx),
            1 => Some(Pool::Rx),
            2 => Some(Pool::RxTables),
            _ => None,
        }
    }
}

/// A run of payload bytes: `len` bytes at `offset` in pool `pool`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Raw [`Pool`] id.
    pub pool: u16,
    /// Reserved, zero.
    pub flags: u16,
    /// Length in bytes (non-zero for a payload extent).
    pub len: u32,
    /// Offset from the start of the pool.
    pub offset: u64,
}

impl Extent {
    /// An extent of `len` bytes at `offset` in `pool`.
    pub const fn new(pool: Pool, offset: u64, len: u32) -> Extent {
        Extent {
            pool: pool as u16,
            flags: 0,
            len,
            offset,
        }
    }
}

bitflags! {
    /// [`TxDesc::flags`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct TxFlags: u16 {
        /// `ext[0]` describes an extent table in the TX pool.
        const INDIRECT = 1 << 0;
    }

    /// [`RxDesc::flags`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct RxFlags: u16 {
        /// `ext[0]` describes an extent table in the RX table area.
        const INDIRECT = 1 << 0;
    }
}

/// Zero words that round a descriptor up to whole cache lines (144 bytes of fields
/// in 192); room for later minor versions.
pub const DESC_RESERVED_WORDS: usize = 6;

/// A send descriptor (kshim → engine). 192 bytes, three cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxDesc {
    /// kshim's handle for the message; returned in the completion.
    pub cookie: u64,
    /// Destination peer NID (its address is the peer's IPv4 or IPv6 address).
    pub peer_nid: Nid,
    /// The 72-byte LNet header, sent as is.
    pub hdr: [u8; LNET_HDR_LEN],
    /// [`TxFlags`] bits.
    pub flags: u16,
    /// Number of payload extents.
    pub nfrags: u16,
    /// Payload bytes, the sum of the extents' lengths.
    pub total_len: u32,
    /// Inline extents, or `ext[0]` = the extent table (flag `INDIRECT`).
    pub ext: [Extent; INLINE_EXTENTS],
    /// Zero (not checked, so a later minor version may give it meaning).
    pub reserved: [u64; DESC_RESERVED_WORDS],
}

/// A receive descriptor (engine → kshim). 192 bytes, three cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxDesc {
    /// Engine-assigned token; kshim gives it back in an [`RxReturn`] to free the buffers.
    pub token: u64,
    /// Source peer NID.
    pub src_nid: Nid,
    /// The 72-byte LNet header as received.
    pub hdr: [u8; LNET_HDR_LEN],
    /// [`RxFlags`] bits.
    pub flags: u16,
    /// Number of payload extents.
    pub nfrags: u16,
    /// Payload bytes, the sum of the extents' lengths.
    pub total_len: u32,
    /// Inline extents, or `ext[0]` = the extent table (flag `INDIRECT`).
    pub ext: [Extent; INLINE_EXTENTS],
    /// Zero (not checked, so a later minor version may give it meaning).
    pub reserved: [u64; DESC_RESERVED_WORDS],
}

/// A send completion (engine → kshim). 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxCompletion {
    /// The [`TxDesc::cookie`] this completes.
    pub cookie: u64,
    /// Raw [`TxStatus`].
    pub status: u32,
    /// Extra detail: for [`TxStatus::InvalidDescriptor`] the [`DescError::code`]; for
    /// [`TxStatus::PeerUnreachable`] and [`TxStatus::TimedOut`] the last errno the
    /// kernel reported for sends to the peer (e.g. `ECONNREFUSED`, `EHOSTUNREACH`),
    /// or 0 when it reported none; else 0.
    pub detail: u32,
}

/// Buffers given back (kshim → engine). 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxReturn {
    /// The [`RxDesc::token`] whose buffers are free again.
    pub token: u64,
}

/// How a send ended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxStatus {
    /// Delivered and acknowledged by the peer.
    Ok = 0,
    /// No route or connection to the peer could be made.
    PeerUnreachable = 1,
    /// The peer did not acknowledge in time.
    TimedOut = 2,
    /// Cancelled (by kshim or by shutdown of the connection).
    Aborted = 3,
    /// The descriptor failed validation; `detail` holds the [`DescError::code`].
    InvalidDescriptor = 4,
    /// The engine lacked memory, credits or connections to take it.
    NoResources = 5,
    /// The engine went away; written by kshim for its own in-flight sends.
    EngineGone = 6,
    /// The peer reset or rejected the connection.
    PeerReset = 7,
    /// The engine is shutting down.
    Shutdown = 8,
}

/// A completion status this build does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown TX completion status {0}")]
pub struct UnknownStatus(pub u32);

impl TryFrom<u32> for TxStatus {
    type Error = UnknownStatus;
    fn try_from(v: u32) -> Result<TxStatus, UnknownStatus> {
        Ok(match v {
            0 => TxStatus::Ok,
            1 => TxStatus::PeerUnreachable,
            2 => TxStatus::TimedOut,
            3 => TxStatus::Aborted,
            4 => TxStatus::InvalidDescriptor,
            5 => TxStatus::NoResources,
            6 => TxStatus::EngineGone,
            7 => TxStatus::PeerReset,
            8 => TxStatus::Shutdown,
            other => return Err(UnknownStatus(other)),
        })
    }
}

impl TxCompletion {
    /// A completion of `cookie` with `status` and `detail`.
    pub const fn new(cookie: u64, status: TxStatus, detail: u32) -> TxCompletion {
        TxCompletion {
            cookie,
            status: status as u32,
            detail,
        }
    }

    /// The error completion for a descriptor that failed validation.
    pub const fn invalid(cookie: u64, err: &DescError) -> TxCompletion {
        TxCompletion::new(cookie, TxStatus::InvalidDescriptor, err.code())
    }

    /// The typed status.
    pub fn status(&self) -> Result<TxStatus, UnknownStatus> {
        TxStatus::try_from(self.status)
    }
}

/// Why a descriptor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DescError {
    /// Flag bits this build does not know.
    #[error("unknown descriptor flags {flags:#x}")]
    UnknownFlags {
        /// The unknown bits.
        flags: u16,
    },
    /// `total_len` above [`MAX_PAYLOAD`].
    #[error("payload of {total} bytes exceeds {max}")]
    PayloadTooLarge {
        /// `total_len`.
        total: u32,
        /// The limit.
        max: u32,
    },
    /// More extents than allowed (256 TX, 1024 RX).
    #[error("{count} extents exceed the limit of {max}")]
    TooManyFragments {
        /// `nfrags`.
        count: u16,
        /// The limit.
        max: u16,
    },
    /// More than [`INLINE_EXTENTS`] extents without the `INDIRECT` flag.
    #[error("{count} extents without an indirect table (at most {INLINE_EXTENTS} inline)")]
    InlineOverflow {
        /// `nfrags`.
        count: u16,
    },
    /// `INDIRECT` with zero extents.
    #[error("indirect descriptor with no extents")]
    EmptyTable,
    /// The extent table is in a pool not allowed for it.
    #[error("extent table in pool {pool} (not allowed here)")]
    TableWrongPool {
        /// Raw pool id.
        pool: u16,
    },
    /// The extent table's length is not `nfrags * 16` or its flags are not zero.
    #[error("extent table of {len} bytes (flags {flags:#x}) does not hold {count} extents")]
    TableLength {
        /// `ext[0].len`.
        len: u32,
        /// `ext[0].flags`.
        flags: u16,
        /// `nfrags`.
        count: u16,
    },
    /// The extent table is not 8-byte aligned.
    #[error("extent table at offset {offset:#x} is not 8-byte aligned")]
    TableMisaligned {
        /// Table offset.
        offset: u64,
    },
    /// The extent table does not lie inside its pool.
    #[error("extent table at {offset:#x}+{len} lies outside its pool")]
    TableOutOfRange {
        /// Table offset.
        offset: u64,
        /// Table length.
        len: u32,
    },
    /// An extent names a pool not allowed here (TX payload must be in the TX pool, RX in
    /// the RX pool) or no pool at all.
    #[error("extent {index} names pool {pool} (not allowed here)")]
    WrongPool {
        /// Extent index.
        index: u16,
        /// Raw pool id.
        pool: u16,
    },
    /// An extent has non-zero reserved flags.
    #[error("extent {index} has reserved flags {flags:#x}")]
    ExtentFlags {
        /// Extent index.
        index: u16,
        /// The flags.
        flags: u16,
    },
    /// An extent has length zero.
    #[error("extent {index} has length zero")]
    ZeroLength {
        /// Extent index.
        index: u16,
    },
    /// `offset + len` overflows.
    #[error("extent {index} at {offset:#x}+{len} overflows")]
    ExtentOverflow {
        /// Extent index.
        index: u16,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// An extent ends beyond its pool.
    #[error("extent {index} at {offset:#x}+{len} lies outside its pool of {pool_len} bytes")]
    ExtentOutOfRange {
        /// Extent index.
        index: u16,
        /// Offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Pool length.
        pool_len: u64,
    },
    /// The extents' lengths do not add up to `total_len`.
    #[error("extents add up to {sum} bytes but the descriptor says {total}")]
    LengthMismatch {
        /// Sum of extent lengths.
        sum: u64,
        /// `total_len`.
        total: u32,
    },
    /// The descriptor's NID is not one this build can use.
    #[error("bad NID: {0}")]
    BadNid(NidError),
}

impl DescError {
    /// A stable number for the variant (1-based), carried in [`TxCompletion::detail`].
    pub const fn code(&self) -> u32 {
        match self {
            DescError::UnknownFlags { .. } => 1,
            DescError::PayloadTooLarge { .. } => 2,
            DescError::TooManyFragments { .. } => 3,
            DescError::InlineOverflow { .. } => 4,
            DescError::EmptyTable => 5,
            DescError::TableWrongPool { .. } => 6,
            DescError::TableLength { .. } => 7,
            DescError::TableMisaligned { .. } => 8,
            DescError::TableOutOfRange { .. } => 9,
            DescError::WrongPool { .. } => 10,
            DescError::ExtentFlags { .. } => 11,
            DescError::ZeroLength { .. } => 12,
            DescError::ExtentOverflow { .. } => 13,
            DescError::ExtentOutOfRange { .. } => 14,
            DescError::LengthMismatch { .. } => 15,
            DescError::BadNid(_) => 16,
        }
    }
}

/// Private scratch space for a validated extent list (room for [`MAX_RX_EXTENTS`]).
/// Allocate one per consumer and reuse it: validation does not allocate.
#[derive(Clone, Debug)]
pub struct ExtentBuf {
    buf: Box<[Extent]>,
}

impl Default for ExtentBuf {
    fn default() -> Self {
        ExtentBuf::new()
    }
}

impl ExtentBuf {
    /// A buffer for up to [`MAX_RX_EXTENTS`] extents.
    pub fn new() -> ExtentBuf {
        ExtentBuf {
            buf: vec![Extent::default(); MAX_RX_EXTENTS as usize].into_boxed_slice(),
        }
    }
}

/// Reads an extent table out of shared memory. Implemented by [`crate::region::Region`];
/// tests and fuzzers implement it over plain memory.
pub trait TableSource {
    /// Copies `out.len()` extents starting at byte `offset` of `pool` into `out`.
    /// The caller has checked that the range lies inside the pool (per the [`Layout`])
    /// and that `offset` is 8-aligned.
    fn copy_table(&self, pool: Pool, offset: u64, out: &mut [Extent]);
}

/// A TX descriptor that passed validation; everything here is private memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidTx<'s> {
    /// Cookie to complete.
    pub cookie: u64,
    /// Destination NID (checked: [`Nid::check`]).
    pub peer_nid: Nid,
    /// LNet header.
    pub hdr: [u8; LNET_HDR_LEN],
    /// Payload bytes.
    pub total_len: u32,
    /// Payload extents, each inside the TX pool, lengths summing to `total_len`.
    pub extents: &'s [Extent],
}

/// An RX descriptor that passed validation; everything here is private memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidRx<'s> {
    /// Token to return.
    pub token: u64,
    /// Source NID (checked: [`Nid::check`]).
    pub src_nid: Nid,
    /// LNet header.
    pub hdr: [u8; LNET_HDR_LEN],
    /// Payload bytes.
    pub total_len: u32,
    /// Payload extents, each inside the RX pool, lengths summing to `total_len`.
    pub extents: &'s [Extent],
}

struct Rules {
    known_flags: u16,
    indirect: u16,
    data_pool: Pool,
    table_pool: Pool,
    max_frags: u16,
}

#[allow(clippy::too_many_arguments)]
fn validate_extents<'s>(
    rules: &Rules,
    flags: u16,
    nfrags: u16,
    total_len: u32,
    ext: &[Extent; INLINE_EXTENTS],
    layout: &Layout,
    tables: &impl TableSource,
    scratch: &'s mut ExtentBuf,
) -> Result<&'s [Extent], DescError> {
    let unknown = flags & !rules.known_flags;
    if unknown != 0 {
        return Err(DescError::UnknownFlags { flags: unknown });
    }
    if total_len > MAX_PAYLOAD {
        return Err(DescError::PayloadTooLarge {
            total: total_len,
            max: MAX_PAYLOAD,
        });
    }
    let n = usize::from(nfrags);
    let list: &'s mut [Extent] = if flags & rules.indirect != 0 {
        if nfrags == 0 {
            return Err(DescError::EmptyTable);
        }
        if nfrags > rules.max_frags {
            return Err(DescError::TooManyFragments {
                count: nfrags,
                max: rules.max_frags,
            });
        }
        let t = ext[0];
        if t.pool != rules.table_pool as u16 {
            return Err(DescError::TableWrongPool { pool: t.pool });
        }
        if t.flags != 0 || t.len as usize != n * core::mem::size_of::<Extent>() {
            return Err(DescError::TableLength {
                len: t.len,
                flags: t.flags,
                count: nfrags,
            });
        }
        if t.offset % 8 != 0 {
            return Err(DescError::TableMisaligned { offset: t.offset });
        }
        let (_, pool_len) = layout.pool(rules.table_pool);
        if t.offset
            .checked_add(u64::from(t.len))
            .is_none_or(|end| end > pool_len)
        {
            return Err(DescError::TableOutOfRange {
                offset: t.offset,
                len: t.len,
            });
        }
        let list = &mut scratch.buf[..n];
        tables.copy_table(rules.table_pool, t.offset, list);
        list
    } else {
        if n > INLINE_EXTENTS {
            return Err(DescError::InlineOverflow { count: nfrags });
        }
        let list = &mut scratch.buf[..n];
        list.copy_from_slice(&ext[..n]);
        list
    };
    let (_, pool_len) = layout.pool(rules.data_pool);
    let mut sum = 0u64;
    for (i, e) in list.iter().enumerate() {
        let index = i as u16;
        if e.pool != rules.data_pool as u16 {
            return Err(DescError::WrongPool {
                index,
                pool: e.pool,
            });
        }
        if e.flags != 0 {
            return Err(DescError::ExtentFlags {
                index,
                flags: e.flags,
            });
        }
        if e.len == 0 {
            return Err(DescError::ZeroLength { index });
        }
        let Some(end) = e.offset.checked_add(u64::from(e.len)) else {
            return Err(DescError::ExtentOverflow {
                index,
                offset: e.offset,
                len: e.len,
            });
        };
        if end > pool_len {
            return Err(DescError::ExtentOutOfRange {
                index,
                offset: e.offset,
                len: e.len,
                pool_len,
            });
        }
        sum += u64::from(e.len);
    }
    if sum != u64::from(total_len) {
        return Err(DescError::LengthMismatch {
            sum,
            total: total_len,
        });
    }
    Ok(list)
}

impl TxDesc {
    /// A descriptor with up to [`INLINE_EXTENTS`] inline extents; `total_len` is their sum.
    ///
    /// # Panics
    /// If `extents` has more than [`INLINE_EXTENTS`] entries.
    pub fn inline(cookie: u64, peer_nid: Nid, hdr: [u8; LNET_HDR_LEN], extents: &[Extent]) -> Self {
        assert!(extents.len() <= INLINE_EXTENTS, "too many inline extents");
        let mut ext = [Extent::default(); INLINE_EXTENTS];
        ext[..extents.len()].copy_from_slice(extents);
        TxDesc {
            cookie,
            peer_nid,
            hdr,
            flags: 0,
            nfrags: extents.len() as u16,
            total_len: extents.iter().map(|e| e.len).fold(0u32, u32::wrapping_add),
            ext,
            reserved: [0; DESC_RESERVED_WORDS],
        }
    }

    /// A descriptor whose `nfrags` extents are in a table at `table_offset` of the TX pool
    /// (written there by kshim, e.g. with [`crate::region::Region::write_extents`]).
    pub fn indirect(
        cookie: u64,
        peer_nid: Nid,
        hdr: [u8; LNET_HDR_LEN],
        table_offset: u64,
        nfrags: u16,
        total_len: u32,
    ) -> Self {
        TxDesc {
            cookie,
            peer_nid,
            hdr,
            flags: TxFlags::INDIRECT.bits(),
            nfrags,
            total_len,
            ext: [
                Extent::new(
                    Pool::Tx,
                    table_offset,
                    u32::from(nfrags) * core::mem::size_of::<Extent>() as u32,
                ),
                Extent::default(),
            ],
            reserved: [0; DESC_RESERVED_WORDS],
        }
    }

    /// Validates this (already privately copied) descriptor against `layout`, copying an
    /// indirect table from `tables` into `scratch`. See the module doc.
    pub fn validate<'s>(
        &self,
        layout: &Layout,
        tables: &impl TableSource,
        scratch: &'s mut ExtentBuf,
    ) -> Result<ValidTx<'s>, DescError> {
        let rules = Rules {
            known_flags: TxFlags::all().bits(),
            indirect: TxFlags::INDIRECT.bits(),
            data_pool: Pool::Tx,
            table_pool: Pool::Tx,
            max_frags: MAX_TX_EXTENTS,
        };
        self.peer_nid.check().map_err(DescError::BadNid)?;
        let extents = validate_extents(
            &rules,
            self.flags,
            self.nfrags,
            self.total_len,
            &self.ext,
            layout,
            tables,
            scratch,
        )?;
        Ok(ValidTx {
            cookie: self.cookie,
            peer_nid: self.peer_nid,
            hdr: self.hdr,
            total_len: self.total_len,
            extents,
        })
    }
}

impl RxDesc {
    /// A descriptor with up to [`INLINE_EXTENTS`] inline extents; `total_len` is their sum.
    ///
    /// # Panics
    /// If `extents` has more than [`INLINE_EXTENTS`] entries.
    pub fn inline(token: u64, src_nid: Nid, hdr: [u8; LNET_HDR_LEN], extents: &[Extent]) -> Self {
        assert!(extents.len() <= INLINE_EXTENTS, "too many inline extents");
        let mut ext = [Extent::default(); INLINE_EXTENTS];
        ext[..extents.len()].copy_from_slice(extents);
        RxDesc {
            token,
            src_nid,
            hdr,
            flags: 0,
            nfrags: extents.len() as u16,
            total_len: extents.iter().map(|e| e.len).fold(0u32, u32::wrapping_add),
            ext,
            reserved: [0; DESC_RESERVED_WORDS],
        }
    }

    /// A descriptor whose `nfrags` extents are in a table at `table_offset` of the RX
    /// table area (written there by the engine).
    pub fn indirect(
        token: u64,
        src_nid: Nid,
        hdr: [u8; LNET_HDR_LEN],
        table_offset: u64,
        nfrags: u16,
        total_len: u32,
    ) -> Self {
        RxDesc {
            token,
            src_nid,
            hdr,
            flags: RxFlags::INDIRECT.bits(),
            nfrags,
            total_len,
            ext: [
                Extent::new(
                    Pool::RxTables,
                    table_offset,
                    u32::from(nfrags) * core::mem::size_of::<Extent>() as u32,
                ),
                Extent::default(),
            ],
            reserved: [0; DESC_RESERVED_WORDS],
        }
    }

    /// Validates this (already privately copied) descriptor against `layout`, copying an
    /// indirect table from `tables` into `scratch`. See the module doc.
    pub fn validate<'s>(
        &self,
        layout: &Layout,
        tables: &impl TableSource,
        scratch: &'s mut ExtentBuf,
    ) -> Result<ValidRx<'s>, DescError> {
        let rules = Rules {
            known_flags: RxFlags::all().bits(),
            indirect: RxFlags::INDIRECT.bits(),
            data_pool: Pool::Rx,
            table_pool: Pool::RxTables,
            max_frags: MAX_RX_EXTENTS,
        };
        self.src_nid.check().map_err(DescError::BadNid)?;
        let extents = validate_extents(
            &rules,
            self.flags,
            self.nfrags,
            self.total_len,
            &self.ext,
            layout,
            tables,
            scratch,
        )?;
        Ok(ValidRx {
            token: self.token,
            src_nid: self.src_nid,
            hdr: self.hdr,
            total_len: self.total_len,
            extents,
        })
    }
}
