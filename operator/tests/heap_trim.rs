//! `heap::trim` gives the pages a process freed back to the system. A test binary of its own:
//! one test, one process, so no other test allocates while the resident size is read.

/// The allocator the operator binary runs on (main.rs).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(any(feature = "jemalloc", all(target_os = "linux", target_env = "gnu")))]
#[test]
fn freed_heap_pages_go_back_to_the_system_when_trimmed() {
    use sealed_ota_operator::heap::{resident_bytes, trim, Trimmed};
    const MIB: u64 = 1 << 20;
    // 64 MiB in 1 KiB blocks (small-object pages, not one mapping each, like the session registry's
    // records), then one block after them, so the heap's top cannot shrink by itself.
    let blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|i| vec![i as u8; 1024]).collect();
    let after_them = vec![1u8; 1024];
    let full = resident_bytes().expect("VmRSS");
    drop(blocks);
    let freed = resident_bytes().expect("VmRSS");
    // The premise: freed, the pages stay resident (glibc keeps them for the next allocations,
    // jemalloc until its decay, 10 s, returns them).
    assert!(
        full.saturating_sub(freed) < 16 * MIB,
        "the allocator gave back {} MiB without a trim",
        full.saturating_sub(freed) / MIB
    );
    let Trimmed::Done { before, after, .. } = trim() else {
        panic!("jemalloc, or glibc on Linux, must trim")
    };
    assert!(
        before.saturating_sub(after) > 48 * MIB,
        "the trim gave back {} MiB of the 64 freed (resident {} -> {} MiB)",
        before.saturating_sub(after) / MIB,
        before / MIB,
        after / MIB
    );
    std::hint::black_box(after_them);
}
