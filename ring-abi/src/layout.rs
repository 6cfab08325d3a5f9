//! The region layout: the header at offset 0, the per-core table, and how a region is laid
//! out from a [`Config`] (creator side) or checked from a header it did not write (mapper side).
//!
//! Everything here is plain data and arithmetic; nothing touches shared memory. The
//! mapper copies the header and the core table out of the mapping once, validates the copy
//! with [`Layout::from_parts`], and from then on works only from its private [`Layout`]:
//! a peer that rewrites the header after the check changes nothing on this side.
//!
//! # The layout algorithm
//!
//! [`Layout::new`] places, in this order, each start aligned as noted:
//!
//! 1. [`RegionHeader`] at 0 (256 bytes);
//! 2. the core table, `cores` × [`CoreEntry`] (96 bytes each), at 256;
//! 3. per core a [`ControlBlock`] (12 cache lines, 768 bytes), 64-aligned;
//! 4. per core the four slot arrays: TX (`tx_entries` × 192), TX completion
//!    (`tx_done_entries` × 16), RX (`rx_entries` × 192), RX return (`rx_return_entries` × 8),
//!    each 64-aligned;
//! 5. the TX pool, page-aligned;
//! 6. the RX extent-table area, page-aligned: per core `rx_tables_per_core` tables of
//!    [`RX_TABLE_BYTES`] each;
//! 7. the RX pool (`rx_buf_count` buffers of `rx_buf_size`), page-aligned;
//! 8. the total size rounded up to a page.
//!
//! A mapper does not require this exact placement: [`Layout::from_parts`] accepts any
//! placement where every part is in bounds, aligned, and no two parts overlap. A kernel
//! implementation may therefore place parts differently, as long as it fills the tables.

use bitflags::bitflags;
use core::mem::size_of;

use crate::desc::{Extent, RxDesc, RxReturn, TxCompletion, TxDesc};

/// `b"LU2KRING"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"LU2KRING");
/// ABI major version: a mapper refuses a region with another major version.
pub const VERSION_MAJOR: u16 = 2;
/// ABI minor version: backwards-compatible additions (reserved fields given meaning).
pub const VERSION_MINOR: u16 = 1;
/// Cache line size assumed by the layout.
pub const CACHE_LINE: u64 = 64;
/// Alignment of the pools.
pub const PAGE: u64 = 4096;
/// Most cores a region describes.
pub const MAX_CORES: u32 = 256;
/// Most entries in one ring.
pub const MAX_RING_ENTRIES: u32 = 1 << 20;
/// Largest message payload (LNet: 1 MiB).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Most extents of a TX descriptor (LNet: 256 fragments).
pub const MAX_TX_EXTENTS: u16 = 256;
/// Most extents of an RX descriptor: a 1 MiB message arrives as ~720 datagram payloads.
pub const MAX_RX_EXTENTS: u16 = 1024;
/// Extents that fit inside a descriptor without an indirect table.
pub const INLINE_EXTENTS: usize = 2;
/// Bytes of one RX indirect extent table (room for [`MAX_RX_EXTENTS`] extents).
pub const RX_TABLE_BYTES: u64 = MAX_RX_EXTENTS as u64 * size_of::<Extent>() as u64;

bitflags! {
    /// Feature bits in the header. A mapper refuses unknown bits: their meaning could
    /// change how the region must be used.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// Producers honour [`crate::doorbell::WAKE_FUTEX`]: a consumer may sleep on the
        /// futex word of its direction (userspace producers only; a kernel rings eventfds).
        const FUTEX_WAKE = 1 << 0;
        /// RX descriptors may reference indirect extent tables in the RX table area.
        const RX_INDIRECT = 1 << 1;
    }
}

/// The region header at offset 0. All offsets are from the start of the region.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHeader {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION_MAJOR`].
    pub version_major: u16,
    /// [`VERSION_MINOR`].
    pub version_minor: u16,
    /// `size_of::<RegionHeader>()` (256); larger in later minor versions.
    pub header_size: u32,
    /// Size of the whole region in bytes; equals the memfd's size.
    pub total_size: u64,
    /// [`Features`] bits.
    pub features: u64,
    /// Number of cores (ring sets).
    pub cores: u32,
    /// `size_of::<CoreEntry>()` (96).
    pub core_entry_size: u32,
    /// Offset of the core table: `cores` × [`CoreEntry`].
    pub core_table_off: u64,
    /// TX payload pool (owned and written by kshim).
    pub tx_pool_off: u64,
    /// Length of the TX pool.
    pub tx_pool_len: u64,
    /// RX payload pool (owned and written by the engine).
    pub rx_pool_off: u64,
    /// Length of the RX pool: `rx_buf_size * rx_buf_count`.
    pub rx_pool_len: u64,
    /// Size of one RX buffer.
    pub rx_buf_size: u32,
    /// Number of RX buffers.
    pub rx_buf_count: u32,
    /// RX indirect extent-table area (owned and written by the engine).
    pub rx_tables_off: u64,
    /// Length of the RX table area, a multiple of [`RX_TABLE_BYTES`].
    pub rx_tables_len: u64,
    /// Cores each peer's messages are spread over ([`crate::stripe`]); 0 (a minor
    /// version 0 region) means 1. See [`Layout::conns_per_peer`].
    pub conns_per_peer: u32,
    /// Zero.
    pub reserved0: u32,
    /// Zero; room for later minor versions.
    pub reserved: [u64; 18],
}

/// Where one ring's slot array lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingInfo {
    /// Offset of the slot array.
    pub off: u64,
    /// Number of slots, a power of two.
    pub entries: u32,
    /// Size of one slot in bytes (checked against the descriptor type).
    pub slot_size: u32,
}

/// One core's ring set, doorbell words and RX table share.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreEntry {
    /// Offset of this core's [`ControlBlock`] (ring indices and doorbell words).
    pub ctrl_off: u64,
    /// Offset of this core's share of the RX table area.
    pub rx_tables_off: u64,
    /// Number of [`RX_TABLE_BYTES`] tables in this core's share.
    pub rx_tables: u32,
    /// Zero.
    pub reserved0: u32,
    /// Zero.
    pub reserved1: u64,
    /// TX ring: kshim → engine, [`TxDesc`].
    pub tx: RingInfo,
    /// TX completion ring: engine → kshim, [`TxCompletion`].
    pub tx_done: RingInfo,
    /// RX ring: engine → kshim, [`RxDesc`].
    pub rx: RingInfo,
    /// RX return ring: kshim → engine, [`RxReturn`].
    pub rx_return: RingInfo,
}

/// One 32-bit word alone on its cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexLine {
    /// The word (used atomically).
    pub value: u32,
    /// Padding to 64 bytes.
    pub pad: [u32; 15],
}

/// Per-core control block: every shared index and doorbell word on its own cache line.
/// The comment on each field says which side writes it; the other side only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlBlock {
    /// TX producer index (kshim writes).
    pub tx_prod: IndexLine,
    /// TX consumer index (engine writes).
    pub tx_cons: IndexLine,
    /// TX completion producer index (engine writes).
    pub tx_done_prod: IndexLine,
    /// TX completion consumer index (kshim writes).
    pub tx_done_cons: IndexLine,
    /// RX producer index (engine writes).
    pub rx_prod: IndexLine,
    /// RX consumer index (kshim writes).
    pub rx_cons: IndexLine,
    /// RX return producer index (kshim writes).
    pub rx_return_prod: IndexLine,
    /// RX return consumer index (engine writes).
    pub rx_return_cons: IndexLine,
    /// Engine's need-wakeup bits for its input rings (engine writes).
    pub to_engine_need_wakeup: IndexLine,
    /// Futex word of the to-engine direction (kshim increments before a futex wake).
    pub to_engine_futex: IndexLine,
    /// Kshim's need-wakeup bits for its input rings (kshim writes).
    pub to_kshim_need_wakeup: IndexLine,
    /// Futex word of the to-kshim direction (engine increments before a futex wake).
    pub to_kshim_futex: IndexLine,
}

/// The four rings of a core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingKind {
    /// kshim → engine send descriptors.
    Tx,
    /// engine → kshim completions.
    TxDone,
    /// engine → kshim receive descriptors.
    Rx,
    /// kshim → engine buffer returns.
    RxReturn,
}

impl RingKind {
    /// All four, in table order.
    pub const ALL: [RingKind; 4] = [
        RingKind::Tx,
        RingKind::TxDone,
        RingKind::Rx,
        RingKind::RxReturn,
    ];

    /// Size of one slot of this ring.
    pub const fn slot_size(self) -> u32 {
        (match self {
            RingKind::Tx => size_of::<TxDesc>(),
            RingKind::TxDone => size_of::<TxCompletion>(),
            RingKind::Rx => size_of::<RxDesc>(),
            RingKind::RxReturn => size_of::<RxReturn>(),
        }) as u32
    }
}

impl CoreEntry {
    /// The ring info of `kind`.
    pub fn ring(&self, kind: RingKind) -> &RingInfo {
        match kind {
            RingKind::Tx => &self.tx,
            RingKind::TxDone => &self.tx_done,
            RingKind::Rx => &self.rx,
            RingKind::RxReturn => &self.rx_return,
        }
    }
}

/// A part of the region, named in layout errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The header.
    Header,
    /// The core table.
    CoreTable,
    /// A core's control block.
    Control(u32),
    /// A core's ring slot array.
    Ring(u32, RingKind),
    /// The TX pool.
    TxPool,
    /// The RX pool.
    RxPool,
    /// The RX table area.
    RxTables,
    /// A core's share of the RX table area.
    CoreRxTables(u32),
}

/// What is wrong with a region header, a core table or a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The first 8 bytes are not [`MAGIC`]: not an lu2k region.
    #[error("bad magic {found:#018x}: not an lu2k ring region")]
    BadMagic {
        /// What was found.
        found: u64,
    },
    /// The region speaks another major ABI version.
    #[error("ABI version {found_major}.{found_minor} cannot be used by this build (major {VERSION_MAJOR}); upgrade the older side")]
    VersionMismatch {
        /// Major version found.
        found_major: u16,
        /// Minor version found.
        found_minor: u16,
    },
    /// `header_size` is smaller than this version's header.
    #[error("header size {found} is smaller than {}", size_of::<RegionHeader>())]
    HeaderSize {
        /// What was found.
        found: u32,
    },
    /// Feature bits this build does not know.
    #[error("unknown feature bits {bits:#x}")]
    UnknownFeatures {
        /// The unknown bits.
        bits: u64,
    },
    /// The header's total size and the mapped file size differ.
    #[error("header says {header} bytes but the region is {actual} bytes")]
    SizeMismatch {
        /// `total_size` from the header.
        header: u64,
        /// Size of the file or mapping.
        actual: u64,
    },
    /// Core count zero or above [`MAX_CORES`].
    #[error("core count {cores} is not in 1..={MAX_CORES}")]
    BadCores {
        /// What was found.
        cores: u32,
    },
    /// `core_entry_size` is not this version's.
    #[error("core entry size {found} is not {}", size_of::<CoreEntry>())]
    CoreEntrySize {
        /// What was found.
        found: u32,
    },
    /// Ring entries not a power of two in 1..=[`MAX_RING_ENTRIES`].
    #[error("core {core} ring {ring:?}: {entries} entries is not a power of two in 1..={MAX_RING_ENTRIES}")]
    BadEntries {
        /// Core.
        core: u32,
        /// Ring.
        ring: RingKind,
        /// What was found.
        entries: u32,
    },
    /// A ring's slot size does not match its descriptor type.
    #[error("core {core} ring {ring:?}: slot size {found}, expected {}", ring.slot_size())]
    SlotSize {
        /// Core.
        core: u32,
        /// Ring.
        ring: RingKind,
        /// What was found.
        found: u32,
    },
    /// RX buffer geometry is invalid (zero, not a multiple of 64, or pool length mismatch).
    #[error("RX buffers: size {size} × count {count} does not describe a pool of {pool_len} bytes with 64-byte multiple sizes")]
    BadRxBuffers {
        /// Buffer size.
        size: u32,
        /// Buffer count.
        count: u32,
        /// Pool length.
        pool_len: u64,
    },
    /// An RX table area or share is not a whole number of tables.
    #[error("{part:?}: length {len} is not a multiple of {RX_TABLE_BYTES}")]
    BadRxTables {
        /// Which part.
        part: Part,
        /// Length found.
        len: u64,
    },
    /// A part starts at a misaligned offset.
    #[error("{part:?} at offset {off:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which part.
        part: Part,
        /// Its offset.
        off: u64,
        /// Required alignment.
        align: u64,
    },
    /// A part does not lie inside the region (or its end overflows).
    #[error("{part:?} at {off:#x}+{len:#x} is outside the region")]
    OutOfBounds {
        /// Which part.
        part: Part,
        /// Its offset.
        off: u64,
        /// Its length.
        len: u64,
    },
    /// Two parts overlap.
    #[error("{a:?} overlaps {b:?}")]
    Overlap {
        /// One part.
        a: Part,
        /// The other.
        b: Part,
    },
    /// The configured sizes overflow or exceed the address space.
    #[error("region too large")]
    TooLarge,
}

/// What the creator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Number of cores (ring sets), 1..=[`MAX_CORES`].
    pub cores: u32,
    /// TX ring entries per core (power of two).
    pub tx_entries: u32,
    /// TX completion ring entries per core (power of two).
    pub tx_done_entries: u32,
    /// RX ring entries per core (power of two).
    pub rx_entries: u32,
    /// RX return ring entries per core (power of two).
    pub rx_return_entries: u32,
    /// TX pool bytes.
    pub tx_pool_len: u64,
    /// Bytes per RX buffer (multiple of 64).
    pub rx_buf_size: u32,
    /// RX buffers.
    pub rx_buf_count: u32,
    /// RX indirect extent tables per core ([`RX_TABLE_BYTES`] each).
    pub rx_tables_per_core: u32,
    /// Feature bits to advertise.
    pub features: Features,
    /// Initial value of every ring index. Any value works (indices are free-running);
    /// tests start near `u32::MAX` to exercise wraparound.
    pub start_index: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cores: 1,
            tx_entries: 1024,
            tx_done_entries: 1024,
            rx_entries: 1024,
            rx_return_entries: 1024,
            tx_pool_len: 16 << 20,
            rx_buf_size: 64 << 10,
            rx_buf_count: 256,
            rx_tables_per_core: 64,
            features: Features::all(),
            start_index: 0,
        }
    }
}

/// A validated region layout: a private copy of the header and the core table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    header: RegionHeader,
    cores: Vec<CoreEntry>,
}

const fn align_up(v: u64, a: u64) -> Option<u64> {
    match v.checked_add(a - 1) {
        Some(x) => Some(x & !(a - 1)),
        None => None,
    }
}

struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: u64, align: u64) -> Result<u64, LayoutError> {
        let off = align_up(self.next, align).ok_or(LayoutError::TooLarge)?;
        self.next = off.checked_add(len).ok_or(LayoutError::TooLarge)?;
        Ok(off)
    }
}

fn check_entries(core: u32, ring: RingKind, entries: u32) -> Result<(), LayoutError> {
    if entries.is_power_of_two() && entries <= MAX_RING_ENTRIES {
        Ok(())
    } else {
        Err(LayoutError::BadEntries {
            core,
            ring,
            entries,
        })
    }
}

impl Layout {
    /// Lays out a new region for `cfg` (see the module doc for the algorithm).
    pub fn new(cfg: &Config) -> Result<Layout, LayoutError> {
        if cfg.cores == 0 || cfg.cores > MAX_CORES {
            return Err(LayoutError::BadCores { cores: cfg.cores });
        }
        let entries = [
            (RingKind::Tx, cfg.tx_entries),
            (RingKind::TxDone, cfg.tx_done_entries),
            (RingKind::Rx, cfg.rx_entries),
            (RingKind::RxReturn, cfg.rx_return_entries),
        ];
        for (ring, n) in entries {
            check_entries(0, ring, n)?;
        }
        let rx_pool_len = u64::from(cfg.rx_buf_size) * u64::from(cfg.rx_buf_count);
        if cfg.rx_buf_size == 0 || cfg.rx_buf_count == 0 || cfg.rx_buf_size % 64 != 0 {
            return Err(LayoutError::BadRxBuffers {
                size: cfg.rx_buf_size,
                count: cfg.rx_buf_count,
                pool_len: rx_pool_len,
            });
        }
        let mut p = Placer { next: 0 };
        let header_off = p.place(size_of::<RegionHeader>() as u64, CACHE_LINE)?;
        debug_assert_eq!(header_off, 0);
        let core_table_off = p.place(
            u64::from(cfg.cores) * size_of::<CoreEntry>() as u64,
            CACHE_LINE,
        )?;
        let mut cores = vec![CoreEntry::default(); cfg.cores as usize];
        for c in cores.iter_mut() {
            c.ctrl_off = p.place(size_of::<ControlBlock>() as u64, CACHE_LINE)?;
        }
        for c in cores.iter_mut() {
            for (ring, n) in entries {
                let slot = ring.slot_size();
                let off = p.place(u64::from(n) * u64::from(slot), CACHE_LINE)?;
                let info = RingInfo {
                    off,
                    entries: n,
                    slot_size: slot,
                };
                match ring {
                    RingKind::Tx => c.tx = info,
                    RingKind::TxDone => c.tx_done = info,
                    RingKind::Rx => c.rx = info,
                    RingKind::RxReturn => c.rx_return = info,
                }
            }
        }
        let tx_pool_off = p.place(cfg.tx_pool_len, PAGE)?;
        let share = u64::from(cfg.rx_tables_per_core)
            .checked_mul(RX_TABLE_BYTES)
            .ok_or(LayoutError::TooLarge)?;
        let rx_tables_len = share
            .checked_mul(u64::from(cfg.cores))
            .ok_or(LayoutError::TooLarge)?;
        let rx_tables_off = p.place(rx_tables_len, PAGE)?;
        for (i, c) in cores.iter_mut().enumerate() {
            c.rx_tables_off = rx_tables_off + share * i as u64;
            c.rx_tables = cfg.rx_tables_per_core;
        }
        let rx_pool_off = p.place(rx_pool_len, PAGE)?;
        let total_size = align_up(p.next, PAGE).ok_or(LayoutError::TooLarge)?;
        if usize::try_from(total_size).is_err() || total_size > i64::MAX as u64 {
            return Err(LayoutError::TooLarge);
        }
        let header = RegionHeader {
            magic: MAGIC,
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            header_size: size_of::<RegionHeader>() as u32,
            total_size,
            features: cfg.features.bits(),
            cores: cfg.cores,
            core_entry_size: size_of::<CoreEntry>() as u32,
            core_table_off,
            tx_pool_off,
            tx_pool_len: cfg.tx_pool_len,
            rx_pool_off,
            rx_pool_len,
            rx_buf_size: cfg.rx_buf_size,
            rx_buf_count: cfg.rx_buf_count,
            rx_tables_off,
            rx_tables_len,
            conns_per_peer: 1,
            reserved0: 0,
            reserved: [0; 18],
        };
        // The creator's own layout must pass the mapper's checks.
        Layout::from_parts(header, cores, total_size)
    }

    /// The checks that need only the header: magic, major version, header size, feature
    /// bits, total size against `actual_size`, core count and core entry size. A mapper
    /// runs these before it reads the core table.
    pub fn check_header(header: &RegionHeader, actual_size: u64) -> Result<(), LayoutError> {
        let h = header;
        if h.magic != MAGIC {
            return Err(LayoutError::BadMagic { found: h.magic });
        }
        if h.version_major != VERSION_MAJOR {
            return Err(LayoutError::VersionMismatch {
                found_major: h.version_major,
                found_minor: h.version_minor,
            });
        }
        if (h.header_size as usize) < size_of::<RegionHeader>() {
            return Err(LayoutError::HeaderSize {
                found: h.header_size,
            });
        }
        let unknown = h.features & !Features::all().bits();
        if unknown != 0 {
            return Err(LayoutError::UnknownFeatures { bits: unknown });
        }
        if h.total_size != actual_size {
            return Err(LayoutError::SizeMismatch {
                header: h.total_size,
                actual: actual_size,
            });
        }
        if h.cores == 0 || h.cores > MAX_CORES {
            return Err(LayoutError::BadCores { cores: h.cores });
        }
        if h.core_entry_size as usize != size_of::<CoreEntry>() {
            return Err(LayoutError::CoreEntrySize {
                found: h.core_entry_size,
            });
        }
        Ok(())
    }

    /// Validates a header and core table copied out of a region of `actual_size` bytes.
    ///
    /// Checks: magic, major version, header size, feature bits, total size against
    /// `actual_size`, core count, entry sizes, ring sizes (power of two), slot sizes, RX
    /// buffer geometry, alignment, bounds, and that no two parts overlap.
    pub fn from_parts(
        header: RegionHeader,
        cores: Vec<CoreEntry>,
        actual_size: u64,
    ) -> Result<Layout, LayoutError> {
        Layout::check_header(&header, actual_size)?;
        let h = &header;
        if cores.len() != h.cores as usize {
            return Err(LayoutError::BadCores { cores: h.cores });
        }
        if h.rx_buf_size == 0
            || h.rx_buf_count == 0
            || h.rx_buf_size % 64 != 0
            || u64::from(h.rx_buf_size) * u64::from(h.rx_buf_count) != h.rx_pool_len
        {
            return Err(LayoutError::BadRxBuffers {
                size: h.rx_buf_size,
                count: h.rx_buf_count,
                pool_len: h.rx_pool_len,
            });
        }
        if h.rx_tables_len % RX_TABLE_BYTES != 0 {
            return Err(LayoutError::BadRxTables {
                part: Part::RxTables,
                len: h.rx_tables_len,
            });
        }

        let total = h.total_size;
        let mut parts: Vec<(u64, u64, Part)> = Vec::with_capacity(6 + cores.len() * 5);
        let mut add = |part: Part, off: u64, len: u64, align: u64| {
            if off % align != 0 {
                return Err(LayoutError::Misaligned { part, off, align });
            }
            match off.checked_add(len) {
                Some(end) if end <= total => {}
                _ => return Err(LayoutError::OutOfBounds { part, off, len }),
            }
            if len > 0 {
                parts.push((off, len, part));
            }
            Ok(())
        };
        add(Part::Header, 0, u64::from(h.header_size), CACHE_LINE)?;
        add(
            Part::CoreTable,
            h.core_table_off,
            u64::from(h.cores) * size_of::<CoreEntry>() as u64,
            8,
        )?;
        for (i, c) in cores.iter().enumerate() {
            let core = i as u32;
            add(
                Part::Control(core),
                c.ctrl_off,
                size_of::<ControlBlock>() as u64,
                CACHE_LINE,
            )?;
            for ring in RingKind::ALL {
                let info = c.ring(ring);
                check_entries(core, ring, info.entries)?;
                if info.slot_size != ring.slot_size() {
                    return Err(LayoutError::SlotSize {
                        core,
                        ring,
                        found: info.slot_size,
                    });
                }
                add(
                    Part::Ring(core, ring),
                    info.off,
                    u64::from(info.entries) * u64::from(info.slot_size),
                    CACHE_LINE,
                )?;
            }
        }
        add(Part::TxPool, h.tx_pool_off, h.tx_pool_len, CACHE_LINE)?;
        add(Part::RxPool, h.rx_pool_off, h.rx_pool_len, CACHE_LINE)?;
        add(Part::RxTables, h.rx_tables_off, h.rx_tables_len, CACHE_LINE)?;

        // Each core's RX table share lies inside the RX table area (shares are the
        // engine's own bookkeeping; they are not checked against each other).
        for (i, c) in cores.iter().enumerate() {
            let part = Part::CoreRxTables(i as u32);
            let len = u64::from(c.rx_tables) * RX_TABLE_BYTES;
            let inside = c.rx_tables_off >= h.rx_tables_off
                && c.rx_tables_off
                    .checked_add(len)
                    .is_some_and(|end| end <= h.rx_tables_off + h.rx_tables_len);
            if len == 0 {
                continue;
            }
            if !inside {
                return Err(LayoutError::OutOfBounds {
                    part,
                    off: c.rx_tables_off,
                    len,
                });
            }
            if (c.rx_tables_off - h.rx_tables_off) % RX_TABLE_BYTES != 0 {
                return Err(LayoutError::Misaligned {
                    part,
                    off: c.rx_tables_off,
                    align: RX_TABLE_BYTES,
                });
            }
        }

        // Stable: parts at equal offsets are reported in table order.
        parts.sort_by_key(|&(off, _, _)| off);
        for w in parts.windows(2) {
            let (a_off, a_len, a) = w[0];
            let (b_off, _, b) = w[1];
            if a_off + a_len > b_off {
                return Err(LayoutError::Overlap { a, b });
            }
        }
        Ok(Layout { header, cores })
    }

    /// The validated header copy.
    pub fn header(&self) -> &RegionHeader {
        &self.header
    }

    /// Number of cores.
    pub fn cores(&self) -> u32 {
        self.header.cores
    }

    /// Cores each peer's messages are spread over by the producer ([`crate::stripe`]),
    /// in `1..=cores`: the header's value, 0 read as 1, more than `cores` as `cores`.
    /// Above 1 a peer's connections live on several cores, so the engine steers
    /// arriving datagrams by destination socket ID rather than by source address.
    pub fn conns_per_peer(&self) -> u32 {
        self.header.conns_per_peer.clamp(1, self.cores().max(1))
    }

    /// The same layout with `n` announced as [`Layout::conns_per_peer`] (creator side,
    /// before the header is written).
    #[must_use]
    pub fn with_conns_per_peer(mut self, n: u32) -> Layout {
        self.header.conns_per_peer = n.clamp(1, self.cores().max(1));
        self
    }

    /// Core `i`'s table entry.
    pub fn core(&self, i: u32) -> Option<&CoreEntry> {
        self.cores.get(i as usize)
    }

    /// All core entries.
    pub fn core_entries(&self) -> &[CoreEntry] {
        &self.cores
    }

    /// Region size in bytes.
    pub fn total_size(&self) -> u64 {
        self.header.total_size
    }

    /// Advertised features.
    pub fn features(&self) -> Features {
        Features::from_bits_truncate(self.header.features)
    }

    /// `(offset, length)` of a pool within the region.
    pub fn pool(&self, pool: crate::desc::Pool) -> (u64, u64) {
        use crate::desc::Pool;
        let h = &self.header;
        match pool {
            Pool::Tx => (h.tx_pool_off, h.tx_pool_len),
            Pool::Rx => (h.rx_pool_off, h.rx_pool_len),
            Pool::RxTables => (h.rx_tables_off, h.rx_tables_len),
        }
    }

    /// Offset within the RX table pool ([`crate::desc::Pool::RxTables`]) of core `core`'s
    /// table `i` (each [`RX_TABLE_BYTES`]), for [`crate::desc::RxDesc::indirect`].
    pub fn rx_table(&self, core: u32, i: u32) -> Option<u64> {
        let c = self.core(core)?;
        (i < c.rx_tables)
            .then(|| c.rx_tables_off - self.header.rx_tables_off + u64::from(i) * RX_TABLE_BYTES)
    }

    /// RX buffer `i` as `(offset within the RX pool, length)`, if it exists.
    pub fn rx_buffer(&self, i: u32) -> Option<(u64, u32)> {
        (i < self.header.rx_buf_count).then(|| {
            (
                u64::from(i) * u64::from(self.header.rx_buf_size),
                self.header.rx_buf_size,
            )
        })
    }
}
