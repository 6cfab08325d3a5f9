//! The TX pool allocator: carves kshim's TX payload pool into fixed-size chunks.
//!
//! The pool is a byte range of the shared region that kshim owns; the engine reads
//! payload from it by extent (pool offset, length). A message of `len` bytes takes
//! `ceil(len / chunk)` chunks, which need not be adjacent — the descriptor carries up
//! to one extent per chunk, and adjacent chunks are merged into one extent.
//!
//! Nothing is allocated per message: the free list is a stack of chunk indices and a
//! buffer's chunks are linked through a `next` array, both sized once at start. Fresh
//! chunks come out in ascending order and a freed buffer's chunks are pushed back so
//! that the next allocation of the same size gets them in the same ascending order,
//! which keeps large buffers contiguous under steady churn.
//!
//! A buffer is returned with [`TxPool::free`] only when its TX completion has
//! arrived (the caller, [`crate::Kshim`], holds the [`TxBuf`] in its in-flight table
//! until then); [`TxBuf`] is not `Clone`, so a buffer cannot be freed twice.
//!
//! Each engine session has a pool of its own (a fresh region, see [`crate::lnd`]);
//! a buffer carries its pool's epoch, and a pool ignores and refuses buffers of an
//! earlier one: their chunks went away with the region they lived in.

/// Why an allocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not enough free chunks now; retry after completions return some.
    #[error("TX pool exhausted: need {need} chunks, {free} free; wait for completions")]
    Exhausted {
        /// Chunks the request needs.
        need: u32,
        /// Chunks free now.
        free: u32,
    },
    /// The request can never fit.
    #[error("{len} bytes do not fit a TX pool of {cap} bytes")]
    TooLarge {
        /// Requested length.
        len: usize,
        /// Pool capacity.
        cap: usize,
    },
}

const END: u32 = u32::MAX;

/// A buffer of the TX pool: a chain of chunks holding `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct TxBuf {
    head: u32,
    chunks: u32,
    len: u32,
    epoch: u32,
}

impl TxBuf {
    /// Bytes of payload the buffer holds.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True for a zero-length buffer (no chunks).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks the buffer holds.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }
}

/// Chunk allocator over a pool of `chunk_count × chunk_size` bytes.
#[derive(Debug)]
pub struct TxPool {
    chunk_size: u32,
    next: Vec<u32>,
    free: Vec<u32>,
    epoch: u32,
}

impl TxPool {
    /// A pool of `pool_len` bytes cut in chunks of `chunk_size` (a trailing partial
    /// chunk is unused). `chunk_size` must be at least 1.
    pub fn new(pool_len: usize, chunk_size: u32) -> TxPool {
        TxPool::with_epoch(pool_len, chunk_size, 0)
    }

    /// Like [`TxPool::new`], for the session numbered `epoch`: buffers of other
    /// epochs are not this pool's ([`TxPool::owns`]).
    pub fn with_epoch(pool_len: usize, chunk_size: u32, epoch: u32) -> TxPool {
        let chunk_size = chunk_size.max(1);
        let count = (pool_len / chunk_size as usize).min(END as usize - 1) as u32;
        // Stack: popping yields 0, 1, 2, …
        let free: Vec<u32> = (0..count).rev().collect();
        TxPool {
            chunk_size,
            next: vec![END; count as usize],
            free,
            epoch,
        }
    }

    /// Whether `buf` came from this pool (and not from a discarded session's).
    pub fn owns(&self, buf: &TxBuf) -> bool {
        buf.epoch == self.epoch
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Total chunks.
    pub fn capacity(&self) -> u32 {
        self.next.len() as u32
    }

    /// Free chunks.
    pub fn free_chunks(&self) -> u32 {
        self.free.len() as u32
    }

    /// Chunks needed for `len` bytes.
    pub fn chunks_for(&self, len: usize) -> usize {
        len.div_ceil(self.chunk_size as usize)
    }

    /// Allocates a buffer for `len` bytes.
    pub fn alloc(&mut self, len: usize) -> Result<TxBuf, Error> {
        let cap = self.next.len() * self.chunk_size as usize;
        if len > cap || len > u32::MAX as usize {
            return Err(Error::TooLarge { len, cap });
        }
        let need = self.chunks_for(len) as u32;
        if need > self.free_chunks() {
            return Err(Error::Exhausted {
                need,
                free: self.free_chunks(),
            });
        }
        let mut head = END;
        let mut tail = END;
        for _ in 0..need {
            // Checked above: `need` chunks are free.
            let Some(c) = self.free.pop() else { break };
            self.next[c as usize] = END;
            if tail == END {
                head = c;
            } else {
                self.next[tail as usize] = c;
            }
            tail = c;
        }
        Ok(TxBuf {
            head,
            chunks: need,
            len: len as u32,
            epoch: self.epoch,
        })
    }

    /// Returns a buffer's chunks. Call only once its TX completion has arrived.
    /// A buffer of another epoch is dropped: its chunks are not this pool's.
    pub fn free(&mut self, buf: TxBuf) {
        if !self.owns(&buf) {
            return;
        }
        // Push in reverse so the next pops return them head first: walk and collect
        // the chain onto the stack, then reverse that segment in place.
        let start = self.free.len();
        let mut c = buf.head;
        let mut n = 0;
        while c != END && n < buf.chunks {
            self.free.push(c);
            c = self.next[c as usize];
            n += 1;
        }
        self.free[start..].reverse();
    }

    /// The buffer's extents as (pool offset, length), adjacent chunks merged; none
    /// for a buffer of another epoch.
    pub fn extents<'a>(&'a self, buf: &'a TxBuf) -> Extents<'a> {
        let mine = self.owns(buf);
        Extents {
            pool: self,
            cur: if mine { buf.head } else { END },
            left: if mine { buf.len } else { 0 },
        }
    }
}

/// Iterator over a buffer's extents (pool offset, length).
#[derive(Debug)]
pub struct Extents<'a> {
    pool: &'a TxPool,
    cur: u32,
    left: u32,
}

impl Iterator for Extents<'_> {
    type Item = (u64, u32);

    fn next(&mut self) -> Option<(u64, u32)> {
        if self.left == 0 || self.cur == END {
            return None;
        }
        let cs = self.pool.chunk_size;
        let start = self.cur;
        let mut len = 0u32;
        let mut c = self.cur;
        loop {
            let take = self.left.min(cs);
            len += take;
            self.left -= take;
            let nx = self.pool.next[c as usize];
            if self.left == 0 || nx == END || nx != c + 1 {
                self.cur = nx;
                break;
            }
            c = nx;
        }
        Some((start as u64 * cs as u64, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contiguous_when_fresh_and_merged() {
        let mut p = TxPool::new(1 << 20, 64 << 10); // 16 chunks
        assert_eq!(p.capacity(), 16);
        let a = p.alloc(200 << 10).unwrap(); // 4 chunks
        assert_eq!(a.chunks(), 4);
        assert_eq!(p.extents(&a).collect::<Vec<_>>(), [(0, 200 << 10)]);
        let b = p.alloc(1).unwrap();
        assert_eq!(p.extents(&b).collect::<Vec<_>>(), [(4 << 16, 1)]);
        let z = p.alloc(0).unwrap();
        assert!(z.is_empty());
        assert_eq!(p.extents(&z).count(), 0);
        assert_eq!(p.free_chunks(), 11);
        p.free(a);
        // Reused after free, same order: contiguous again.
        let c = p.alloc(256 << 10).unwrap();
        assert_eq!(p.extents(&c).collect::<Vec<_>>(), [(0, 256 << 10)]);
        assert_eq!(
            p.alloc(1 << 30),
            Err(Error::TooLarge {
                len: 1 << 30,
                cap: 1 << 20
            })
        );
        assert_eq!(
            p.alloc(12 << 16),
            Err(Error::Exhausted { need: 12, free: 11 })
        );
        p.free(b);
        p.free(c);
        p.free(z);
        assert_eq!(p.free_chunks(), 16);
    }

    /// A buffer of a discarded session's pool is neither freed into nor read from
    /// the next session's pool.
    #[test]
    fn buffers_of_another_epoch_are_not_this_pools() {
        let mut old = TxPool::with_epoch(1 << 20, 64 << 10, 1);
        let stale = old.alloc(128 << 10).unwrap();
        let mut p = TxPool::with_epoch(1 << 20, 64 << 10, 2);
        let mine = p.alloc(64 << 10).unwrap();
        assert!(p.owns(&mine) && !p.owns(&stale));
        assert_eq!(p.extents(&stale).count(), 0);
        p.free(stale);
        assert_eq!(p.free_chunks(), 15, "a stale buffer added chunks");
        p.free(mine);
        assert_eq!(p.free_chunks(), 16);
    }

    #[test]
    fn fragmented_extents() {
        let mut p = TxPool::new(8 * 100, 100);
        let bufs: Vec<TxBuf> = (0..8).map(|_| p.alloc(100).unwrap()).collect();
        let mut it = bufs.into_iter();
        let _b0 = it.next().unwrap();
        let b1 = it.next().unwrap();
        let _b2 = it.next().unwrap();
        let b3 = it.next().unwrap();
        p.free(b1);
        p.free(b3);
        // Free stack pops 3 then 1: two extents, not adjacent.
        let x = p.alloc(150).unwrap();
        assert_eq!(p.extents(&x).collect::<Vec<_>>(), [(300, 100), (100, 50)]);
    }

    proptest! {
        /// Under random churn: live buffers never overlap, extents cover exactly `len`
        /// bytes inside the pool, and the pool neither grows nor leaks.
        #[test]
        fn churn(ops in prop::collection::vec((any::<bool>(), 0usize..5000, any::<usize>()), 1..400)) {
            let mut p = TxPool::new(64 * 512, 512);
            let cap = p.capacity();
            let next_cap = p.next.capacity();
            let free_cap = p.free.capacity();
            let mut live: Vec<TxBuf> = Vec::new();
            for (alloc, len, pick) in ops {
                if alloc || live.is_empty() {
                    match p.alloc(len) {
                        Ok(b) => live.push(b),
                        Err(Error::Exhausted { .. }) => {
                            prop_assert!(p.chunks_for(len) as u32 > p.free_chunks());
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                } else {
                    let b = live.swap_remove(pick % live.len());
                    p.free(b);
                }
                let mut used = vec![false; 64 * 512];
                for b in &live {
                    let mut total = 0;
                    for (off, l) in p.extents(b) {
                        total += l as usize;
                        for byte in &mut used[off as usize..off as usize + l as usize] {
                            prop_assert!(!*byte, "overlap");
                            *byte = true;
                        }
                    }
                    prop_assert_eq!(total, b.len());
                }
                let held: u32 = live.iter().map(|b| b.chunks()).sum();
                prop_assert_eq!(held + p.free_chunks(), cap);
            }
            for b in live.drain(..) {
                p.free(b);
            }
            prop_assert_eq!(p.free_chunks(), cap);
            prop_assert_eq!(p.next.capacity(), next_cap);
            prop_assert_eq!(p.free.capacity(), free_cap);
        }
    }
}
