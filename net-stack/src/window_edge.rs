//! Keeps the receive window's right edge that peers see from ever moving backwards.
//!
//! smoltcp advertises `free buffer >> shift` with window scaling, rounding down. When a segment
//! whose length is not a multiple of `1 << shift` arrives, the rounding can move the right edge
//! (acknowledgement + window) back by up to `(1 << shift) - 1` bytes, and smoltcp then trims
//! whatever arrives beyond its new edge. A sender that already filled the previous window loses
//! those bytes and must retransmit them; one that never retransmits (OpenVMM's consomme, which
//! assumes a lossless link to its guest) leaves a permanent hole and the connection stalls with
//! its frames still arriving (seen as `bytes_received=0` behind consomme, 4 bytes short of the
//! 256 KiB buffer: 1460 ≡ 4 mod 8).
//!
//! Advertising one window unit less than smoltcp on every non-SYN segment makes any edge a peer
//! was ever shown lie at least `1 << shift` bytes behind smoltcp's own, which never falls more
//! than `(1 << shift) - 1` bytes behind an earlier one: what a peer sends within the window it
//! was shown is always taken. The cost is one unit (8 bytes with a 256 KiB buffer) of window.

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPV6_HEADER: usize = 40;
const PROTOCOL_TCP: u8 = 6;
const TCP_HEADER: usize = 20;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS: usize = 13;
/// Offset of the window field in the TCP header.
const TCP_WINDOW: usize = 14;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

/// Offset of the TCP header in an outgoing frame, or `None` when it is not plain TCP over IPv4 or
/// IPv6 (smoltcp emits neither VLAN tags nor IPv6 extension headers).
fn tcp_offset(frame: &[u8]) -> Option<usize> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let tcp = match ethertype {
        ETHERTYPE_IPV4 => {
            let version_ihl = *frame.get(ETHERNET_HEADER)?;
            let protocol = *frame.get(ETHERNET_HEADER + 9)?;
            if version_ihl >> 4 != 4 || protocol != PROTOCOL_TCP {
                return None;
            }
            ETHERNET_HEADER + usize::from(version_ihl & 0x0f) * 4
        }
        ETHERTYPE_IPV6 => {
            if *frame.get(ETHERNET_HEADER + 6)? != PROTOCOL_TCP {
                return None;
            }
            ETHERNET_HEADER + IPV6_HEADER
        }
        _ => return None,
    };
    (frame.len() >= tcp + TCP_HEADER).then_some(tcp)
}

/// Lowers the window of an outgoing TCP segment by one unit (see the module documentation),
/// before its checksum is computed. SYN segments (whose window is never scaled), resets and
/// zero windows are left alone.
pub(crate) fn hold_back_one_unit(frame: &mut [u8]) {
    let Some(tcp) = tcp_offset(frame) else {
        return;
    };
    if frame[tcp + TCP_FLAGS] & (SYN | RST) != 0 {
        return;
    }
    let field = tcp + TCP_WINDOW;
    let window = u16::from_be_bytes([frame[field], frame[field + 1]]);
    frame[field..field + 2].copy_from_slice(&window.saturating_sub(1).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    /// An Ethernet + IPv4 (or IPv6) + TCP frame with `flags` and `window`, 10 bytes of payload.
    fn segment(ipv6: bool, flags: u8, window: u16) -> Vec<u8> {
        let mut frame = vec![0u8; ETHERNET_HEADER];
        if ipv6 {
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = [0u8; IPV6_HEADER];
            ip[0] = 0x60;
            ip[6] = PROTOCOL_TCP;
            frame.extend_from_slice(&ip);
        } else {
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[9] = PROTOCOL_TCP;
            frame.extend_from_slice(&ip);
        }
        let mut tcp = [0u8; TCP_HEADER];
        tcp[12] = 5 << 4;
        tcp[TCP_FLAGS] = flags;
        tcp[TCP_WINDOW..TCP_WINDOW + 2].copy_from_slice(&window.to_be_bytes());
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(&[0x5a; 10]);
        frame
    }

    fn window_of(frame: &[u8]) -> u16 {
        let tcp = tcp_offset(frame).unwrap();
        u16::from_be_bytes([frame[tcp + TCP_WINDOW], frame[tcp + TCP_WINDOW + 1]])
    }

    #[test]
    fn acknowledgements_advertise_one_unit_less() {
        for ipv6 in [false, true] {
            let mut frame = segment(ipv6, 0x10, 32_768);
            let before = frame.clone();
            hold_back_one_unit(&mut frame);
            assert_eq!(window_of(&frame), 32_767);
            let tcp = tcp_offset(&frame).unwrap();
            // Nothing but the window changed.
            assert_eq!(frame[..tcp + TCP_WINDOW], before[..tcp + TCP_WINDOW]);
            assert_eq!(frame[tcp + 16..], before[tcp + 16..]);
        }
    }

    #[test]
    fn syn_reset_zero_window_and_other_frames_are_untouched() {
        for (flags, window) in [(0x12, 65_535), (0x02, 65_535), (0x14, 100), (0x10, 0)] {
            let mut frame = segment(false, flags, window);
            let before = frame.clone();
            hold_back_one_unit(&mut frame);
            assert_eq!(frame, before, "flags {flags:#04x} window {window}");
        }
        let mut udp = segment(false, 0x10, 500);
        udp[ETHERNET_HEADER + 9] = 17;
        let before = udp.clone();
        hold_back_one_unit(&mut udp);
        assert_eq!(udp, before);
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let before = arp.clone();
        hold_back_one_unit(&mut arp);
        assert_eq!(arp, before);
        let mut short = segment(false, 0x10, 500);
        short.truncate(ETHERNET_HEADER + 20 + 10);
        let before = short.clone();
        hold_back_one_unit(&mut short);
        assert_eq!(short, before, "a truncated header is not touched");
    }
}
