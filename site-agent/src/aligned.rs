//! [`AlignedBuf`]: a zeroed heap buffer aligned for direct I/O, the only `unsafe` code of
//! the agent (allocation, slices over it, deallocation), each block with its SAFETY argument.

/// Alignment of direct I/O buffers, offsets and lengths.
pub const DIO_ALIGN: usize = 4096;

/// A zeroed buffer aligned for direct I/O.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> std::alloc::Layout {
        // DIO_ALIGN is a power of two and len.max(1) rounded up cannot overflow isize
        // for the chunk sizes we accept (<= 256 MiB).
        // A smaller fallback layout would make the slices below unsound, so refuse instead.
        match std::alloc::Layout::from_size_align(len.max(1).next_multiple_of(DIO_ALIGN), DIO_ALIGN)
        {
            Ok(l) => l,
            Err(_) => panic!("an aligned buffer of {len} bytes cannot be laid out"),
        }
    }

    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (allocated zeroed) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}
