//! The DMA allocator shares addresses with OpenVMM's view of guest memory both ways.

use net_device::DmaAllocator;
use tandem_conformance::GuestDma;

#[test]
fn host_writes_are_seen_by_the_driver_side() {
    let dma = GuestDma::new(4 << 20, 0);
    let region = dma.allocate(8192, 4096).unwrap();
    dma.memory()
        .write_at(region.phys().0 + 4096, b"from the host")
        .unwrap();
    assert_eq!(&region.as_slice()[4096..4096 + 13], b"from the host");
}

#[test]
fn a_multi_megabyte_region_fits_and_is_contiguous_for_the_host() {
    let dma = GuestDma::new(16 << 20, 0);
    let mut region = dma.allocate(4 << 20, 4096).unwrap();
    let last = region.len() - 1;
    region.as_mut_slice()[last] = 0x5a;
    let mut byte = [0u8];
    dma.memory()
        .read_at(region.phys().0 + last as u64, &mut byte)
        .unwrap();
    assert_eq!(byte, [0x5a]);
}
