//! What the fake 82576 does with transmit offload requests and receive checksums, modelled on
//! the datasheet's description of the hardware (§7.2.2.5 context descriptors, §7.2.3.2.3
//! checksum insertion, §7.2.4 TSO, §7.1.5.2 receive status) and checked against QEMU's igb
//! where it differs (noted inline).
//!
//! Deliberately independent of the driver's `offload` module: it reads only descriptor fields
//! (MACLEN, IPLEN, L4LEN, MSS, TUCMD, POPTS, PAYLEN), as hardware does, so a wrong descriptor
//! shows up as a wrong frame or a recorded fault rather than being "understood".

use crate::descriptors::RxStatus;
use crate::descriptors::{
    AdvancedTxContextDescriptor, ContextCommand, TX_PAYLEN_SHIFT, TxCommand, TxOffloadOptions,
};
use crate::pf_regs as pf;
use alloc::vec::Vec;
use net_device::checksum::{add, fold};

/// Data descriptors QEMU accepts per packet (`E1000E_MAX_TX_FRAGS` in `igb_core.c`); it drops
/// a packet with more.
pub(crate) const MAX_DESCRIPTORS_PER_PACKET: usize = 64;

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn put_be16(frame: &mut [u8], at: usize, value: u16) {
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn ipv4_header_checksum(frame: &mut [u8], mac: usize, end: usize) {
    put_be16(frame, mac + 10, 0);
    let sum = !fold(add(0, &frame[mac..end]));
    put_be16(frame, mac + 10, sum);
}

/// The hardware's L4 checksum: everything from `start` to the end of the frame summed with
/// whatever the checksum field holds, plus `extra` (the segment's L4 length for TSO).
fn insert_l4_checksum(frame: &mut [u8], start: usize, field: usize, extra: u64, udp: bool) {
    let mut sum = !fold(add(extra, &frame[start..]));
    if udp && sum == 0 {
        sum = 0xFFFF;
    }
    put_be16(frame, field, sum);
}

/// Applies the offloads one packet asks for. `command`/`olinfo` are its first data
/// descriptor's; `contexts` the queue's context slots. `Err` = what real hardware would do
/// something undefined with (recorded as a fault by the model, the packet dropped).
pub(crate) fn transmit_offloads(
    mut frame: Vec<u8>,
    command: TxCommand,
    olinfo: u32,
    contexts: &[Option<AdvancedTxContextDescriptor>; 2],
) -> Result<Vec<Vec<u8>>, &'static str> {
    let options = TxOffloadOptions::from_bits_truncate(olinfo);
    let segment = command.contains(TxCommand::TSE);
    let paylen = (olinfo >> TX_PAYLEN_SHIFT) as usize;
    if options.is_empty() && !segment {
        if paylen != frame.len() {
            return Err("PAYLEN is not the frame length");
        }
        return Ok(alloc::vec![frame]);
    }
    // QEMU reads one bit of IDX (`igb_setup_tx_offloads`).
    let context = contexts[((olinfo >> 4) & 1) as usize].ok_or("offload with no context loaded")?;
    let tucmd = context.command();
    let (mac, ip) = (context.mac_header_len(), context.ip_header_len());
    let ipv4 = tucmd.contains(ContextCommand::IPV4);
    let tcp = tucmd.contains(ContextCommand::L4_TCP);
    let start = mac + ip;
    let l4_minimum = if tcp { 20 } else { 8 };
    if mac < 14 || ip < if ipv4 { 20 } else { 40 } || start + l4_minimum > frame.len() {
        return Err("MACLEN/IPLEN do not fit the frame");
    }
    let field = start + if tcp { 16 } else { 6 };
    if !segment {
        if paylen != frame.len() {
            return Err("PAYLEN is not the frame length");
        }
        if options.contains(TxOffloadOptions::L4_CHECKSUM) {
            insert_l4_checksum(&mut frame, start, field, 0, !tcp);
        }
        if options.contains(TxOffloadOptions::IP_CHECKSUM) {
            if !ipv4 {
                return Err("IXSM on an IPv6 frame");
            }
            ipv4_header_checksum(&mut frame, mac, start);
        }
        return Ok(alloc::vec![frame]);
    }
    if !tcp || !options.contains(TxOffloadOptions::L4_CHECKSUM) {
        return Err("TSE without TCP checksum offload");
    }
    let (l4_len, mss) = (context.l4_header_len(), context.mss());
    let headers = start + l4_len;
    if l4_len < 20 || mss == 0 || headers > frame.len() {
        return Err("L4LEN/MSS do not fit the frame");
    }
    let payload = &frame[headers..];
    if paylen != payload.len() {
        return Err("TSO PAYLEN is not the payload length");
    }
    // §7.2.4: the checksum field holds the pseudo-header sum without the length; the device
    // adds each segment's L4 length.
    let chunks: Vec<&[u8]> = payload.chunks(mss).collect();
    let sequence = u32::from_be_bytes([
        frame[start + 4],
        frame[start + 5],
        frame[start + 6],
        frame[start + 7],
    ]);
    let mut segments = Vec::with_capacity(chunks.len());
    for (number, chunk) in chunks.iter().enumerate() {
        let mut segment = frame[..headers].to_vec();
        segment.extend_from_slice(chunk);
        let segment_len = segment.len();
        if ipv4 {
            put_be16(&mut segment, mac + 2, (segment_len - mac) as u16);
            let id = be16(&segment, mac + 4).wrapping_add(number as u16);
            put_be16(&mut segment, mac + 4, id);
            if options.contains(TxOffloadOptions::IP_CHECKSUM) {
                ipv4_header_checksum(&mut segment, mac, start);
            }
        } else {
            put_be16(&mut segment, mac + 4, (segment_len - mac - 40) as u16);
        }
        let this_sequence = sequence.wrapping_add((number * mss) as u32);
        segment[start + 4..start + 8].copy_from_slice(&this_sequence.to_be_bytes());
        if number + 1 < chunks.len() {
            segment[start + 13] &= !0x09; // FIN, PSH: last segment only
        }
        if number > 0 {
            segment[start + 13] &= !0x80; // CWR: first segment only
        }
        let l4_length = (segment_len - start) as u64;
        insert_l4_checksum(&mut segment, start, field, l4_length, false);
        segments.push(segment);
    }
    Ok(segments)
}

/// The write-back status bits QEMU's igb reports for a received `frame` when it verifies the
/// checksums itself (`igb_verify_csum_in_sw`): IPCS (+IPE) for IPv4 if RXCSUM.IPOFLD, TCPCS
/// (+UDPCS for UDP, +L4E when wrong) for unfragmented TCP/UDP if RXCSUM.TUOFLD.
pub(crate) fn receive_checksum_status(frame: &[u8], rxcsum: u32) -> u32 {
    let mut status = 0;
    if frame.len() < 14 {
        return status;
    }
    let (mac, ethertype) = match be16(frame, 12) {
        0x8100 if frame.len() >= 18 => (18, be16(frame, 16)),
        ethertype => (14, ethertype),
    };
    let (protocol, start, end, pseudo) = match ethertype {
        0x0800 => {
            if frame.len() < mac + 20 || frame[mac] >> 4 != 4 {
                return status;
            }
            let header = usize::from(frame[mac] & 0xF) * 4;
            let total = usize::from(be16(frame, mac + 2));
            if header < 20 || total < header || mac + total > frame.len() {
                return status;
            }
            if rxcsum & pf::RXCSUM_IP_OFFLOAD != 0 {
                status |= RxStatus::IP_CHECKSUM.bits();
                if fold(add(0, &frame[mac..mac + header])) != 0xFFFF {
                    status |= RxStatus::IP_CHECKSUM_ERROR.bits();
                }
            }
            if be16(frame, mac + 6) & 0x3FFF != 0 {
                return status;
            }
            let protocol = frame[mac + 9];
            let pseudo = add(0, &frame[mac + 12..mac + 20]);
            let l4 = (total - header) as u64;
            (
                protocol,
                mac + header,
                mac + total,
                pseudo + u64::from(protocol) + l4,
            )
        }
        0x86DD => {
            if frame.len() < mac + 40 || frame[mac] >> 4 != 6 {
                return status;
            }
            let end = mac + 40 + usize::from(be16(frame, mac + 4));
            if end > frame.len() {
                return status;
            }
            let protocol = frame[mac + 6];
            let pseudo = add(0, &frame[mac + 8..mac + 40]);
            let l4 = (end - mac - 40) as u64;
            (protocol, mac + 40, end, pseudo + u64::from(protocol) + l4)
        }
        _ => return status,
    };
    let (udp, minimum) = match protocol {
        6 => (false, 20),
        17 => (true, 8),
        _ => return status,
    };
    if rxcsum & pf::RXCSUM_L4_OFFLOAD == 0 || end - start < minimum {
        return status;
    }
    status |= RxStatus::TCP_CHECKSUM.bits();
    if udp {
        status |= RxStatus::UDP_CHECKSUM.bits();
    }
    let no_checksum = udp && ethertype == 0x0800 && be16(frame, start + 6) == 0;
    if !no_checksum && fold(add(pseudo, &frame[start..end])) != 0xFFFF {
        status |= RxStatus::L4_CHECKSUM_ERROR.bits();
    }
    status
}
