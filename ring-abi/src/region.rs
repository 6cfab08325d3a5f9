//! The region: one sealed memfd mapping shared by kshim and the engine, and the typed
//! handles each side uses on it.
//!
//! kshim (the creator) calls [`Region::create`]; the memfd is sealed against shrinking
//! and growing, so the mapping can never be cut short under the peer. The engine (the
//! mapper) receives the fd and calls [`Region::from_fd`], which requires the shrink
//! seal, copies the header and core table out once and validates the copy (see
//! [`crate::layout`]). From then on each side works from its private [`Layout`].
//! Where the kernel module is the creator, the engine maps the device instead
//! ([`Region::from_device`]): no seals, the size is the one the device fixed.
//!
//! Each side attaches to a core's ring set once ([`Region::kshim_core`],
//! [`Region::engine_core`]); the handles own the single producer or consumer end of
//! each ring, which is what keeps every ring single-producer single-consumer.
//!
//! Payload bytes are reached by extent: [`Region::pool_bytes`] (read),
//! [`Region::write_pool`] and [`Region::write_extents`] (the owner writes: kshim the TX
//! pool, the engine the RX pool and RX tables), [`Region::pool_base`] (raw address for
//! io_uring buffer registration).

use core::mem::{offset_of, size_of};
use core::ptr::NonNull;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};
use rustix::io::Errno;

use crate::desc::{
    DescError, Extent, ExtentBuf, Pool, RxDesc, RxReturn, TableSource, TxCompletion, TxDesc,
    ValidRx, ValidTx,
};
use crate::doorbell::{Eventfds, Notifier, Waiter};
use crate::layout::{
    Config, ControlBlock, CoreEntry, Layout, LayoutError, Part, RegionHeader, RingInfo,
};
use crate::ring::{Consumer, Producer, Slot};
use crate::shm::{Mapping, SharedWord, SlotArray};

/// Which side of the region a process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The kernel half: produces TX and RX-return, consumes TX-completion and RX.
    Kshim,
    /// The engine: produces TX-completion and RX, consumes TX and RX-return.
    Engine,
}

/// Why a region could not be created, mapped or attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The header, core table or config is invalid.
    #[error("invalid region layout: {0}")]
    Layout(#[from] LayoutError),
    /// A syscall failed (memfd_create, ftruncate, mmap, fstat, fcntl).
    #[error("region syscall failed: {0}")]
    Io(#[from] Errno),
    /// The fd is smaller than a header.
    #[error("region of {size} bytes is too small to hold a header")]
    TooSmall {
        /// File size.
        size: u64,
    },
    /// The fd is not sealed against shrinking: the peer could truncate it and crash us.
    #[error("region memfd lacks F_SEAL_SHRINK; the creator must seal it (Region::create does)")]
    NotSealed,
    /// No such core.
    #[error("core {core} does not exist (region has {cores})")]
    NoSuchCore {
        /// Asked for.
        core: u32,
        /// Cores in the region.
        cores: u32,
    },
    /// This side of this core was already attached through this `Region`.
    #[error("core {core} is already attached as {side:?} in this process")]
    AlreadyAttached {
        /// Core.
        core: u32,
        /// Side.
        side: Side,
    },
}

#[derive(Debug)]
struct Inner {
    map: Arc<Mapping>,
    fd: OwnedFd,
    layout: Layout,
    /// Two per core: [kshim, engine].
    attached: Vec<AtomicBool>,
}

/// A mapped region. Cheap to clone (shared handle).
#[derive(Clone, Debug)]
pub struct Region {
    inner: Arc<Inner>,
}

/// kshim's handles on one core.
#[derive(Debug)]
pub struct KshimCore {
    /// Core number.
    pub core: u32,
    /// Produce send descriptors.
    pub tx: Producer<TxDesc>,
    /// Consume send completions.
    pub tx_done: Consumer<TxCompletion>,
    /// Consume receive descriptors.
    pub rx: Consumer<RxDesc>,
    /// Produce buffer returns.
    pub rx_return: Producer<RxReturn>,
    /// Wake the engine after committing to `tx` or `rx_return`.
    pub to_engine: Notifier,
    /// Sleep until the engine commits to `tx_done` or `rx`.
    pub wait: Waiter,
}

/// The engine's handles on one core.
#[derive(Debug)]
pub struct EngineCore {
    /// Core number.
    pub core: u32,
    /// Consume send descriptors.
    pub tx: Consumer<TxDesc>,
    /// Produce send completions.
    pub tx_done: Producer<TxCompletion>,
    /// Produce receive descriptors.
    pub rx: Producer<RxDesc>,
    /// Consume buffer returns.
    pub rx_return: Consumer<RxReturn>,
    /// Wake kshim after committing to `tx_done` or `rx`.
    pub to_kshim: Notifier,
    /// Sleep until kshim commits to `tx` or `rx_return`.
    pub wait: Waiter,
}

impl Region {
    /// Creates a region for `cfg` in a new memfd (close-on-exec, sealed against
    /// shrinking, growing and further sealing) and maps it.
    pub fn create(cfg: &Config) -> Result<Region, RegionError> {
        Region::create_striped(cfg, 1)
    }

    /// [`Region::create`] for a producer that spreads each peer's messages over
    /// `conns_per_peer` cores ([`crate::stripe`]); the header announces it.
    pub fn create_striped(cfg: &Config, conns_per_peer: u32) -> Result<Region, RegionError> {
        let layout = Layout::new(cfg)?.with_conns_per_peer(conns_per_peer);
        let total = layout.total_size();
        let fd = memfd_create("lu2k-ring", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        ftruncate(&fd, total)?;
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let map = Arc::new(Mapping::map(&fd, total as usize)?);
        let h = layout.header();
        for (i, c) in layout.core_entries().iter().enumerate() {
            map.write(h.core_table_off + (i * size_of::<CoreEntry>()) as u64, *c);
            for field in [
                offset_of!(ControlBlock, tx_prod),
                offset_of!(ControlBlock, tx_cons),
                offset_of!(ControlBlock, tx_done_prod),
                offset_of!(ControlBlock, tx_done_cons),
                offset_of!(ControlBlock, rx_prod),
                offset_of!(ControlBlock, rx_cons),
                offset_of!(ControlBlock, rx_return_prod),
                offset_of!(ControlBlock, rx_return_cons),
            ] {
                SharedWord::new(&map, c.ctrl_off + field as u64)
                    .get()
                    .store(cfg.start_index, Ordering::Relaxed);
            }
        }
        map.write(0, *h);
        Ok(Region::new(map, fd, layout))
    }

    /// Maps a region created by the other side and validates its header.
    pub fn from_fd(fd: OwnedFd) -> Result<Region, RegionError> {
        let size = fstat(&fd)?.st_size as u64;
        if !fcntl_get_seals(&fd)?.contains(SealFlags::SHRINK) {
            return Err(RegionError::NotSealed);
        }
        Region::map_and_check(fd, size)
    }

    /// Maps `size` bytes of the kernel module's device file (`/dev/lu2k`, attached to
    /// an instance) and validates the header as [`Region::from_fd`] does. A device has
    /// no seals: the module fixes the size (the region is allocated once per instance
    /// and freed only when no engine holds it; a mapping past its end is refused), and
    /// the header must state it.
    pub fn from_device(fd: OwnedFd, size: u64) -> Result<Region, RegionError> {
        Region::map_and_check(fd, size)
    }

    fn map_and_check(fd: OwnedFd, size: u64) -> Result<Region, RegionError> {
        if size < size_of::<RegionHeader>() as u64 || usize::try_from(size).is_err() {
            return Err(RegionError::TooSmall { size });
        }
        let map = Arc::new(Mapping::map(&fd, size as usize)?);
        let header: RegionHeader = map.read(0);
        Layout::check_header(&header, size)?;
        let table_len = u64::from(header.cores) * size_of::<CoreEntry>() as u64;
        let in_bounds = header
            .core_table_off
            .checked_add(table_len)
            .is_some_and(|end| end <= size);
        if !in_bounds || header.core_table_off % 8 != 0 {
            return Err(LayoutError::OutOfBounds {
                part: Part::CoreTable,
                off: header.core_table_off,
                len: table_len,
            }
            .into());
        }
        let mut cores = vec![CoreEntry::default(); header.cores as usize];
        map.read_slice(header.core_table_off, &mut cores);
        let layout = Layout::from_parts(header, cores, size)?;
        Ok(Region::new(map, fd, layout))
    }

    fn new(map: Arc<Mapping>, fd: OwnedFd, layout: Layout) -> Region {
        let attached = (0..layout.cores() * 2)
            .map(|_| AtomicBool::new(false))
            .collect();
        Region {
            inner: Arc::new(Inner {
                map,
                fd,
                layout,
                attached,
            }),
        }
    }

    /// The memfd (to pass to the other side, e.g. with SCM_RIGHTS).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// The validated layout.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    fn attach(&self, core: u32, side: Side) -> Result<CoreEntry, RegionError> {
        let entry = *self
            .inner
            .layout
            .core(core)
            .ok_or(RegionError::NoSuchCore {
                core,
                cores: self.inner.layout.cores(),
            })?;
        let slot = core as usize * 2 + usize::from(side == Side::Engine);
        if self.inner.attached[slot].swap(true, Ordering::AcqRel) {
            return Err(RegionError::AlreadyAttached { core, side });
        }
        Ok(entry)
    }

    fn word(&self, c: &CoreEntry, field: usize) -> SharedWord {
        SharedWord::new(&self.inner.map, c.ctrl_off + field as u64)
    }

    fn slots<T: Slot>(&self, r: &RingInfo) -> SlotArray<T> {
        SlotArray::new(&self.inner.map, r.off, r.entries)
    }

    /// Attaches kshim's side of `core`: producer of TX and RX-return, consumer of
    /// TX-completion and RX. Uses `fds.to_engine` to ring and `fds.to_kshim` to sleep.
    /// Once per core per `Region`.
    pub fn kshim_core(&self, core: u32, fds: Eventfds) -> Result<KshimCore, RegionError> {
        let c = self.attach(core, Side::Kshim)?;
        type Cb = ControlBlock;
        Ok(KshimCore {
            core,
            tx: Producer::new(
                self.word(&c, offset_of!(Cb, tx_prod)),
                self.word(&c, offset_of!(Cb, tx_cons)),
                self.slots(&c.tx),
            ),
            tx_done: Consumer::new(
                self.word(&c, offset_of!(Cb, tx_done_prod)),
                self.word(&c, offset_of!(Cb, tx_done_cons)),
                self.slots(&c.tx_done),
            ),
            rx: Consumer::new(
                self.word(&c, offset_of!(Cb, rx_prod)),
                self.word(&c, offset_of!(Cb, rx_cons)),
                self.slots(&c.rx),
            ),
            rx_return: Producer::new(
                self.word(&c, offset_of!(Cb, rx_return_prod)),
                self.word(&c, offset_of!(Cb, rx_return_cons)),
                self.slots(&c.rx_return),
            ),
            to_engine: Notifier::new(
                self.word(&c, offset_of!(Cb, to_engine_need_wakeup)),
                self.word(&c, offset_of!(Cb, to_engine_futex)),
                fds.to_engine,
            ),
            wait: Waiter::new(
                self.word(&c, offset_of!(Cb, to_kshim_need_wakeup)),
                self.word(&c, offset_of!(Cb, to_kshim_futex)),
                fds.to_kshim,
            ),
        })
    }

    /// Attaches the engine's side of `core`: consumer of TX and RX-return, producer of
    /// TX-completion and RX. Uses `fds.to_kshim` to ring and `fds.to_engine` to sleep.
    /// Once per core per `Region`.
    pub fn engine_core(&self, core: u32, fds: Eventfds) -> Result<EngineCore, RegionError> {
        let c = self.attach(core, Side::Engine)?;
        type Cb = ControlBlock;
        Ok(EngineCore {
            core,
            tx: Consumer::new(
                self.word(&c, offset_of!(Cb, tx_prod)),
                self.word(&c, offset_of!(Cb, tx_cons)),
                self.slots(&c.tx),
            ),
            tx_done: Producer::new(
                self.word(&c, offset_of!(Cb, tx_done_prod)),
                self.word(&c, offset_of!(Cb, tx_done_cons)),
                self.slots(&c.tx_done),
            ),
            rx: Producer::new(
                self.word(&c, offset_of!(Cb, rx_prod)),
                self.word(&c, offset_of!(Cb, rx_cons)),
                self.slots(&c.rx),
            ),
            rx_return: Consumer::new(
                self.word(&c, offset_of!(Cb, rx_return_prod)),
                self.word(&c, offset_of!(Cb, rx_return_cons)),
                self.slots(&c.rx_return),
            ),
            to_kshim: Notifier::new(
                self.word(&c, offset_of!(Cb, to_kshim_need_wakeup)),
                self.word(&c, offset_of!(Cb, to_kshim_futex)),
                fds.to_kshim,
            ),
            wait: Waiter::new(
                self.word(&c, offset_of!(Cb, to_engine_need_wakeup)),
                self.word(&c, offset_of!(Cb, to_engine_futex)),
                fds.to_engine,
            ),
        })
    }

    /// Region offset of `len` bytes at `offset` in `pool`, if inside the pool.
    fn locate(&self, pool: Pool, offset: u64, len: u64) -> Option<u64> {
        let (pool_off, pool_len) = self.inner.layout.pool(pool);
        let end = offset.checked_add(len)?;
        (end <= pool_len).then_some(pool_off + offset)
    }

    /// The payload bytes of `ext`, checked against its pool.
    ///
    /// The bytes live in shared memory: the owner of the pool may change them (it should
    /// not while the extent is in flight, and if it does it only spoils its own message).
    /// Read them as plain bytes; do not validate then re-read.
    pub fn pool_bytes(&self, ext: &Extent) -> Result<&[u8], DescError> {
        let pool = Pool::from_raw(ext.pool).ok_or(DescError::WrongPool {
            index: 0,
            pool: ext.pool,
        })?;
        let off = self.locate(pool, ext.offset, u64::from(ext.len)).ok_or(
            DescError::ExtentOutOfRange {
                index: 0,
                offset: ext.offset,
                len: ext.len,
                pool_len: self.inner.layout.pool(pool).1,
            },
        )?;
        Ok(self.inner.map.bytes(off, u64::from(ext.len)))
    }

    /// Copies `data` into `pool` at `offset` (the pool's owner does this: kshim for the
    /// TX pool, the engine for the RX pool).
    pub fn write_pool(&self, pool: Pool, offset: u64, data: &[u8]) -> Result<(), DescError> {
        let off =
            self.locate(pool, offset, data.len() as u64)
                .ok_or(DescError::ExtentOutOfRange {
                    index: 0,
                    offset,
                    len: data.len().try_into().unwrap_or(u32::MAX),
                    pool_len: self.inner.layout.pool(pool).1,
                })?;
        self.inner.map.copy_in(off, data);
        Ok(())
    }

    /// Writes an extent table at `offset` of `pool` (8-aligned), for an indirect
    /// descriptor: kshim in the TX pool, the engine in the RX table area.
    pub fn write_extents(&self, pool: Pool, offset: u64, ext: &[Extent]) -> Result<(), DescError> {
        let len = size_of_val(ext) as u64;
        if offset % 8 != 0 {
            return Err(DescError::TableMisaligned { offset });
        }
        let off = self
            .locate(pool, offset, len)
            .ok_or(DescError::TableOutOfRange {
                offset,
                len: len.try_into().unwrap_or(u32::MAX),
            })?;
        self.inner.map.write_slice(off, ext);
        Ok(())
    }

    /// Base address and length of a pool in this process (for io_uring buffer
    /// registration). The pointer is valid while any clone of this `Region` or any of its
    /// handles lives.
    pub fn pool_base(&self, pool: Pool) -> (NonNull<u8>, usize) {
        let (off, len) = self.inner.layout.pool(pool);
        let p = self.inner.map.base().as_ptr().wrapping_add(off as usize);
        (NonNull::new(p).expect("mapping is non-null"), len as usize)
    }

    /// Size of the mapping.
    pub fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// Always false (a region has at least a header); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Validates a TX descriptor copy (engine side); see [`TxDesc::validate`].
    pub fn validate_tx<'s>(
        &self,
        desc: &TxDesc,
        scratch: &'s mut ExtentBuf,
    ) -> Result<ValidTx<'s>, DescError> {
        desc.validate(&self.inner.layout, self, scratch)
    }

    /// Validates an RX descriptor copy (kshim side); see [`RxDesc::validate`].
    pub fn validate_rx<'s>(
        &self,
        desc: &RxDesc,
        scratch: &'s mut ExtentBuf,
    ) -> Result<ValidRx<'s>, DescError> {
        desc.validate(&self.inner.layout, self, scratch)
    }
}

impl TableSource for Region {
    fn copy_table(&self, pool: Pool, offset: u64, out: &mut [Extent]) {
        let off = self
            .locate(pool, offset, size_of_val(out) as u64)
            .expect("extent table range validated against the layout");
        self.inner.map.read_slice(off, out);
    }
}
