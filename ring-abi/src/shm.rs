//! The only place that touches the shared mapping through raw pointers.
//!
//! [`Mapping`] owns one `MAP_SHARED` mapping of the region's memfd and unmaps it on drop.
//! Everything else borrows it through an `Arc<Mapping>`, so a pointer handed out here is
//! valid for as long as the object holding it lives.
//!
//! The other process is not trusted. What makes raw access sound anyway:
//! - every type read or written here is [`Pod`]: `#[repr(C)]`, integers and arrays of
//!   integers only, no padding that matters, valid for every bit pattern — a value
//!   scribbled by the peer is at worst a wrong value, never undefined behaviour;
//! - slot reads are single volatile reads into a private copy (no re-reading, see
//!   `desc` on TOCTOU); slot indices are masked, so they are always in bounds;
//! - shared index and doorbell words are only accessed as `AtomicU32` (same size and
//!   alignment as `u32`; every bit pattern valid);
//! - byte ranges are bounds-checked against the mapping before a slice or copy is made.
#![allow(unsafe_code)]

use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::AtomicU32;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::desc::{Extent, RxDesc, RxReturn, TxCompletion, TxDesc};
use crate::layout::{CoreEntry, RegionHeader};

/// Plain old data: `#[repr(C)]`, only integer fields, valid for every bit pattern.
///
/// # Safety
/// Implement only for types where every bit pattern is a valid value and which contain
/// no pointers, references or niches.
pub(crate) unsafe trait Pod: Copy + 'static {}

// SAFETY: each of these is #[repr(C)] and consists of integers and integer arrays only
// (layout tests in tests/layout.rs check sizes and offsets); any bit pattern is valid.
unsafe impl Pod for TxDesc {}
// SAFETY: as above.
unsafe impl Pod for RxDesc {}
// SAFETY: as above.
unsafe impl Pod for TxCompletion {}
// SAFETY: as above.
unsafe impl Pod for RxReturn {}
// SAFETY: as above.
unsafe impl Pod for Extent {}
// SAFETY: as above.
unsafe impl Pod for RegionHeader {}
// SAFETY: as above.
unsafe impl Pod for CoreEntry {}

/// One shared mapping of the whole region.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access to it goes through atomics,
// volatile copies or bounds-checked byte copies, none of which depend on the thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only gives out the same kinds of access.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, read-write.
    pub(crate) fn map(fd: impl AsFd, len: usize) -> rustix::io::Result<Mapping> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        if len == 0 {
            return Err(rustix::io::Errno::INVAL);
        }
        // SAFETY: a fresh mapping at an address the kernel picks (null hint) cannot alias
        // any existing Rust object; we own it until `munmap` in Drop.
        let ptr = unsafe {
            mmap(
                core::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(rustix::io::Errno::INVAL)?;
        Ok(Mapping { base, len })
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Base address (for io_uring buffer registration and the like).
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn check(&self, off: u64, len: u64, align: usize) -> usize {
        let end = off.checked_add(len).expect("range overflows");
        assert!(
            end <= self.len as u64,
            "range {off:#x}+{len:#x} outside the mapping"
        );
        assert!(off as usize % align == 0, "misaligned offset {off:#x}");
        off as usize
    }

    /// Copies a `T` out of the mapping at `off` (one volatile read).
    ///
    /// # Panics
    /// If the range is outside the mapping or misaligned for `T`.
    pub(crate) fn read<T: Pod>(&self, off: u64) -> T {
        let off = self.check(off, size_of::<T>() as u64, align_of::<T>());
        // SAFETY: `check` proved [off, off+size) inside the mapping and aligned for T; T is
        // Pod, so whatever the peer wrote there is a valid T.
        unsafe {
            self.base
                .as_ptr()
                .wrapping_add(off)
                .cast::<T>()
                .read_volatile()
        }
    }

    /// Writes a `T` into the mapping at `off` (one volatile write).
    ///
    /// # Panics
    /// If the range is outside the mapping or misaligned for `T`.
    pub(crate) fn write<T: Pod>(&self, off: u64, v: T) {
        let off = self.check(off, size_of::<T>() as u64, align_of::<T>());
        // SAFETY: bounds and alignment as in `read`. The mapping is shared memory: no Rust
        // reference to these bytes exists (slices from `bytes` are read-only views whose
        // owner protocol forbids writes under them; see `Region::pool_bytes`).
        unsafe {
            self.base
                .as_ptr()
                .wrapping_add(off)
                .cast::<T>()
                .write_volatile(v)
        }
    }

    /// A read-only view of `len` bytes at `off`.
    ///
    /// # Panics
    /// If the range is outside the mapping.
    pub(crate) fn bytes(&self, off: u64, len: u64) -> &[u8] {
        let off = self.check(off, len, 1);
        // SAFETY: in bounds (checked). u8 is valid for every value. The bytes may be
        // changed by the peer process; a reader sees some sequence of byte values, which
        // is the documented contract of payload views (see `Region::pool_bytes`).
        unsafe { core::slice::from_raw_parts(self.base.as_ptr().wrapping_add(off), len as usize) }
    }

    /// Copies `data` into the mapping at `off`.
    ///
    /// # Panics
    /// If the range is outside the mapping.
    pub(crate) fn copy_in(&self, off: u64, data: &[u8]) {
        let off = self.check(off, data.len() as u64, 1);
        // SAFETY: the destination range is inside the mapping (checked). `data` may itself
        // be a view into this mapping (from `bytes`), so the copy is a memmove (`copy`),
        // which allows overlap.
        unsafe {
            core::ptr::copy(
                data.as_ptr(),
                self.base.as_ptr().wrapping_add(off),
                data.len(),
            )
        }
    }

    /// Copies `out.len()` `T`s starting at `off` into `out` (volatile, element by element).
    ///
    /// # Panics
    /// If the range is outside the mapping or misaligned.
    pub(crate) fn read_slice<T: Pod>(&self, off: u64, out: &mut [T]) {
        let bytes = (size_of_val(out)) as u64;
        let off = self.check(off, bytes, align_of::<T>());
        let src = self.base.as_ptr().wrapping_add(off).cast::<T>();
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: i < out.len(), so src+i is inside the checked range, aligned; T is Pod.
            *o = unsafe { src.wrapping_add(i).read_volatile() };
        }
    }

    /// Writes `data` at `off` element by element.
    ///
    /// # Panics
    /// If the range is outside the mapping or misaligned.
    pub(crate) fn write_slice<T: Pod>(&self, off: u64, data: &[T]) {
        let bytes = (size_of_val(data)) as u64;
        let off = self.check(off, bytes, align_of::<T>());
        let dst = self.base.as_ptr().wrapping_add(off).cast::<T>();
        for (i, v) in data.iter().enumerate() {
            // SAFETY: i < data.len(), so dst+i is inside the checked range.
            unsafe { dst.wrapping_add(i).write_volatile(*v) };
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned; every user of the mapping
        // holds an Arc<Mapping>, so this runs after the last of them is gone.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// A 32-bit word in the mapping used atomically (a ring index or a doorbell word).
#[derive(Debug, Clone)]
pub(crate) struct SharedWord {
    ptr: NonNull<AtomicU32>,
    _map: Arc<Mapping>,
}

// SAFETY: the word is only accessed as an AtomicU32, which is Sync; the Arc keeps the
// mapping alive.
unsafe impl Send for SharedWord {}
// SAFETY: as above.
unsafe impl Sync for SharedWord {}

impl SharedWord {
    /// The word at `off`.
    ///
    /// # Panics
    /// If out of bounds or not 4-aligned.
    pub(crate) fn new(map: &Arc<Mapping>, off: u64) -> SharedWord {
        let off = map.check(off, 4, align_of::<AtomicU32>());
        let ptr = NonNull::new(map.base.as_ptr().wrapping_add(off).cast())
            .expect("inside a non-null mapping");
        SharedWord {
            ptr,
            _map: Arc::clone(map),
        }
    }

    /// The atomic.
    #[inline(always)]
    pub(crate) fn get(&self) -> &AtomicU32 {
        // SAFETY: aligned and in bounds (checked in `new`), the mapping lives as long as
        // `self` (Arc). AtomicU32 has the size and alignment of u32 and every bit pattern
        // is valid; both processes access this word only atomically.
        unsafe { self.ptr.as_ref() }
    }
}

/// A ring's slot array: `mask + 1` slots of `T` (a power of two).
#[derive(Debug)]
pub(crate) struct SlotArray<T> {
    base: NonNull<T>,
    mask: u32,
    _map: Arc<Mapping>,
    _t: PhantomData<T>,
}

// SAFETY: slots are only accessed by volatile copies of Pod values; ownership of a slot
// between the two sides is decided by the ring indices, not by the thread.
unsafe impl<T: Pod> Send for SlotArray<T> {}

impl<T: Pod> SlotArray<T> {
    /// `entries` slots at `off`.
    ///
    /// # Panics
    /// If `entries` is not a power of two, or the array is out of bounds or misaligned.
    pub(crate) fn new(map: &Arc<Mapping>, off: u64, entries: u32) -> SlotArray<T> {
        assert!(entries.is_power_of_two());
        let off = map.check(
            off,
            u64::from(entries) * size_of::<T>() as u64,
            align_of::<T>(),
        );
        let base = NonNull::new(map.base.as_ptr().wrapping_add(off).cast())
            .expect("inside a non-null mapping");
        SlotArray {
            base,
            mask: entries - 1,
            _map: Arc::clone(map),
            _t: PhantomData,
        }
    }

    /// Number of slots.
    #[inline(always)]
    pub(crate) fn entries(&self) -> u32 {
        self.mask + 1
    }

    /// Copies slot `index & mask` out: each 8-byte word read exactly once (volatile), into
    /// a private value. Word-wise because a volatile read of a whole 128-byte struct
    /// compiles to a slow byte-wise copy.
    #[inline(always)]
    pub(crate) fn read(&self, index: u32) -> T {
        const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() >= 8) };
        let src = self
            .base
            .as_ptr()
            .wrapping_add((index & self.mask) as usize)
            .cast::<u64>();
        let mut out = MaybeUninit::<T>::uninit();
        let dst = out.as_mut_ptr().cast::<u64>();
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: `index & mask` < entries, so the slot is inside the array checked in
            // `new`, 8-aligned (T is, by the const assert); word i < size/8 is inside it.
            // The caller (ring::Consumer) only reads slots the producer has published
            // (between our consumer index and the Acquire-loaded producer index).
            let w = unsafe { src.wrapping_add(i).read_volatile() };
            // SAFETY: `dst` is the private, suitably aligned `out`; word i is inside it.
            unsafe { dst.wrapping_add(i).write(w) };
        }
        // SAFETY: every byte of `out` was written above (size is a multiple of 8), and T is
        // Pod, so any bytes form a valid T.
        unsafe { out.assume_init() }
    }

    /// Writes slot `index & mask`, 8-byte word by word (volatile).
    #[inline(always)]
    pub(crate) fn write(&self, index: u32, v: T) {
        const { assert!(size_of::<T>() % 8 == 0 && align_of::<T>() >= 8) };
        let dst = self
            .base
            .as_ptr()
            .wrapping_add((index & self.mask) as usize)
            .cast::<u64>();
        let src = (&raw const v).cast::<u64>();
        for i in 0..size_of::<T>() / 8 {
            // SAFETY: `src` is the private, 8-aligned `v`; word i is inside it, and T is Pod
            // (no padding bytes in the slot types: the layout test checks every byte is a
            // field), so each word is initialised.
            let w = unsafe { src.wrapping_add(i).read() };
            // SAFETY: in bounds and aligned as in `read`. The caller (ring::Producer) only
            // writes slots it owns: between its producer index and the Acquire-loaded
            // consumer index + entries, which the consumer has released.
            unsafe { dst.wrapping_add(i).write_volatile(w) };
        }
    }
}
