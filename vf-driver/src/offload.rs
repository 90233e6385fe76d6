//! Transmit offload planning: reads a frame and the stack's [`TxMeta`], decides what the 82576
//! is asked to do (TCP/UDP checksum insertion, TCP segmentation) or what the driver completes in
//! software, rewrites the headers the way the device needs them, and describes the result as
//! [`TxPacket`]s for the ring.
//!
//! Facts this follows (read for facts, nothing copied):
//! * 82576 datasheet §7.2.2.5 / §7.2.3.2.3 (context descriptor: MACLEN ≤ 127, IPLEN ≤ 511,
//!   TUCMD.L4T/IPV4, MSS, L4LEN; MACLEN + IPLEN + L4LEN < 512) and §7.2.4 (TSO: the device
//!   writes each segment's IPv4 total length / IPv6 payload length, IPv4 identification, TCP
//!   sequence number and flags; the TCP checksum field must hold the pseudo-header sum without
//!   the L4 length). Linux `igb_tso`/`igbvf_tso` do the same conversion: they zero the IPv4
//!   total length and header checksum (IXSM recomputes it) or the IPv6 payload length, and
//!   subtract the payload length from the pseudo-header sum.
//! * QEMU 10 igb (`igb_setup_tx_offloads`, `net_tx_pkt_build_vheader`,
//!   `net_tx_pkt_update_ip_checksums`, `net_tx_pkt_do_sw_csum`,
//!   `net_tx_pkt_do_sw_fragmentation`): it ignores MACLEN/IPLEN/L4T and parses the frame
//!   itself; for TSO it rewrites the IPv4 total length and header checksum and puts its own
//!   pseudo-header sum (with the whole L4 length) into the TCP checksum field, so the values
//!   left here are acceptable to it. Two quirks shape this module: its software checksum uses
//!   the descriptors' byte count as the L4 length, so the zero padding this driver adds to
//!   frames under 60 bytes would corrupt an offloaded checksum (such frames are completed in
//!   software); and its software segmentation (`net_tx_pkt_tcp_fragment_init`, used when the
//!   backend takes no virtio-net header, e.g. user networking) clears FIN and PSH on *every*
//!   segment, so a TSO frame carrying FIN is sent without it, followed by a header-only FIN
//!   segment the driver builds itself.

use crate::descriptors::{
    AdvancedTxContextDescriptor, CONTEXT_INDEX_SHIFT, CONTEXT_IPLEN_MASK, CONTEXT_L4LEN_SHIFT,
    CONTEXT_MACLEN_SHIFT, CONTEXT_MAX_MACLEN, CONTEXT_MSS_SHIFT, ContextCommand, Le32,
    TX_CONTEXT_INDEX_SHIFT, TX_CONTEXT_SLOTS, TX_PAYLEN_SHIFT, TxCommand, TxOffloadOptions,
};
use crate::ring::{MIN_FRAME_LEN, TxPacket};
use core::fmt;
use net_device::TxMeta;
use net_device::checksum::{add, fold};

/// Ethernet header without a VLAN tag.
const ETHERNET_HEADER: usize = 14;
/// One 802.1Q tag.
const VLAN_TAG: usize = 4;
/// 802.1Q tag protocol identifier.
const ETHERTYPE_VLAN: u16 = 0x8100;
/// IPv4 ethertype.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// IPv6 ethertype.
const ETHERTYPE_IPV6: u16 = 0x86DD;
/// IPv4 header without options.
const IPV4_MIN_HEADER: usize = 20;
/// The fixed IPv6 header.
const IPV6_HEADER: usize = 40;
/// IP protocol number of TCP.
const PROTOCOL_TCP: u8 = 6;
/// IP protocol number of UDP.
const PROTOCOL_UDP: u8 = 17;
/// IPv4 flags/fragment offset bits that make a datagram a fragment (MF and the offset).
const IPV4_FRAGMENT_BITS: u16 = 0x3FFF;
/// Where the checksum field sits in a TCP header.
const TCP_CHECKSUM_OFFSET: usize = 16;
/// Where the checksum field sits in a UDP header.
const UDP_CHECKSUM_OFFSET: usize = 6;
/// TCP header without options.
const TCP_MIN_HEADER: usize = 20;
/// TCP header with the most options (data offset 15).
const TCP_MAX_HEADER: usize = 60;
/// Offset of the TCP flags byte.
const TCP_FLAGS: usize = 13;
/// TCP flag: no more data from the sender.
const TCP_FIN: u8 = 0x01;
/// TCP flag: push.
const TCP_PSH: u8 = 0x08;
/// TCP flag: congestion window reduced.
const TCP_CWR: u8 = 0x80;
/// MACLEN + IPLEN + L4LEN must stay below 512 (§7.2.2.5).
const MAX_SEGMENTATION_HEADERS: usize = 511;
/// Context slot for checksum-only frames; TSO uses the other one, so a bulk TCP stream's data
/// and its pure ACKs never evict each other's context.
pub(crate) const CHECKSUM_CONTEXT: usize = 0;
/// Context slot for TSO frames.
pub(crate) const SEGMENTATION_CONTEXT: usize = 1;

const _: () =
    assert!(CHECKSUM_CONTEXT < TX_CONTEXT_SLOTS && SEGMENTATION_CONTEXT < TX_CONTEXT_SLOTS);

/// The transport protocol whose checksum is offloaded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Transport {
    Tcp,
    Udp,
}

/// Header layout of a frame the device can checksum.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Layout {
    /// MACLEN: Ethernet header, with one VLAN tag if present.
    pub mac_len: usize,
    /// IPLEN: IP header including IPv4 options.
    pub ip_len: usize,
    /// IPv4 (else IPv6).
    pub ipv4: bool,
    /// The transport protocol.
    pub transport: Transport,
}

impl Layout {
    /// Where the transport header starts.
    pub(crate) fn start(&self) -> usize {
        self.mac_len + self.ip_len
    }
}

/// A TSO request the device can carry out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Segmentation {
    /// The frame's headers (TCP).
    pub layout: Layout,
    /// Payload bytes per segment.
    pub mss: u16,
    /// MACLEN + IPLEN + L4LEN.
    pub headers_len: usize,
    /// TCP payload bytes of the whole frame (PAYLEN).
    pub payload_len: usize,
    /// Segments the device makes.
    pub segments: usize,
    /// The frame carries FIN (sent as a separate header-only segment).
    pub fin: bool,
}

/// A request in [`TxMeta`] the driver could not honour.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BadRequest {
    /// The checksum field lies (partly) beyond the frame.
    ChecksumOutsideFrame,
    /// Segmentation was asked for without checksum offload.
    SegmentationWithoutChecksum,
    /// Segmentation of something that is not a plain TCP/IPv4 or TCP/IPv6 frame.
    SegmentationNotTcp,
    /// Segmentation with an MSS of 0, or one that leaves a frame under 60 bytes.
    BadMss,
    /// A segment (headers + MSS) would exceed the MTU.
    SegmentTooLarge,
    /// Header lengths that do not fit the frame or the context descriptor, or an IP length
    /// that disagrees with the frame's.
    MalformedHeaders,
    /// A frame above the MTU without a usable segmentation request.
    OversizedWithoutSegmentation,
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadRequest::ChecksumOutsideFrame => "checksum field outside the frame",
            BadRequest::SegmentationWithoutChecksum => "segmentation without checksum offload",
            BadRequest::SegmentationNotTcp => "segmentation of a frame that is not TCP over IP",
            BadRequest::BadMss => "unusable MSS",
            BadRequest::SegmentTooLarge => "headers + MSS exceed the MTU",
            BadRequest::MalformedHeaders => "header lengths that do not fit the frame",
            BadRequest::OversizedWithoutSegmentation => "frame above the MTU without segmentation",
        })
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Request {
    /// No offload wanted: send as written.
    Plain,
    /// A checksum the device cannot insert for this frame: the driver completes it.
    Software(SoftwareChecksum),
    /// The device inserts the TCP/UDP checksum.
    Checksum(Layout),
    /// The device segments the frame.
    Segment(Segmentation),
    /// The frame cannot be sent.
    Refuse(BadRequest),
}

/// Where a checksum the driver completes itself lies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct SoftwareChecksum {
    /// First byte summed.
    pub start: usize,
    /// The checksum field, relative to `start`.
    pub offset: usize,
    /// One past the last byte summed (the end of the IP packet when known).
    pub end: usize,
    /// UDP: a computed 0 is sent as 0xFFFF (0 means "no checksum").
    pub udp: bool,
}

/// A [`Request`] plus a part of the metadata that was ignored (counted by the caller).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Classified {
    pub request: Request,
    pub ignored: Option<BadRequest>,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

fn put_be16(frame: &mut [u8], at: usize, value: u16) {
    if let Some(field) = frame.get_mut(at..at + 2) {
        field.copy_from_slice(&value.to_be_bytes());
    }
}

/// The IP header as parsed from the frame.
#[derive(Clone, Copy, Debug)]
struct Ip {
    mac_len: usize,
    ipv4: bool,
    /// IPv4 IHL × 4, or the fixed IPv6 header.
    header_len: usize,
    /// IPv4 protocol or IPv6 next header.
    protocol: u8,
    /// One past the IP packet's last byte, per its length field.
    end: usize,
    fragment: bool,
}

fn parse_ip(frame: &[u8]) -> Option<Ip> {
    let ethertype = be16(frame, 12)?;
    let (mac_len, ethertype) = if ethertype == ETHERTYPE_VLAN {
        (ETHERNET_HEADER + VLAN_TAG, be16(frame, 16)?)
    } else {
        (ETHERNET_HEADER, ethertype)
    };
    let version = *frame.get(mac_len)? >> 4;
    match ethertype {
        ETHERTYPE_IPV4 if version == 4 => {
            let header_len = usize::from(frame[mac_len] & 0xF) * 4;
            let total = usize::from(be16(frame, mac_len + 2)?);
            let end = mac_len + total;
            if header_len < IPV4_MIN_HEADER || total < header_len || end > frame.len() {
                return None;
            }
            Some(Ip {
                mac_len,
                ipv4: true,
                header_len,
                protocol: *frame.get(mac_len + 9)?,
                end,
                fragment: be16(frame, mac_len + 6)? & IPV4_FRAGMENT_BITS != 0,
            })
        }
        ETHERTYPE_IPV6 if version == 6 => {
            let end = mac_len + IPV6_HEADER + usize::from(be16(frame, mac_len + 4)?);
            if end > frame.len() {
                return None;
            }
            Some(Ip {
                mac_len,
                ipv4: false,
                header_len: IPV6_HEADER,
                protocol: *frame.get(mac_len + 6)?,
                end,
                fragment: false,
            })
        }
        _ => None,
    }
}

/// The layout when the device can checksum from `start` with the field at `offset`: the IP
/// header is exactly `start - MACLEN` long (no IPv6 extension headers: QEMU would parse them
/// itself and could disagree), fits IPLEN, and the protocol matches the field offset.
fn device_layout(ip: &Ip, start: usize, offset: usize) -> Option<Layout> {
    let ip_len = start.checked_sub(ip.mac_len)?;
    if ip_len != ip.header_len
        || ip_len > CONTEXT_IPLEN_MASK as usize
        || ip.mac_len > CONTEXT_MAX_MACLEN
        || ip.fragment
    {
        return None;
    }
    let transport = match (offset, ip.protocol) {
        (TCP_CHECKSUM_OFFSET, PROTOCOL_TCP) => Transport::Tcp,
        (UDP_CHECKSUM_OFFSET, PROTOCOL_UDP) => Transport::Udp,
        _ => return None,
    };
    Some(Layout {
        mac_len: ip.mac_len,
        ip_len,
        ipv4: ip.ipv4,
        transport,
    })
}

/// `Ok(None)`: the frame fits one segment, so plain checksum offload does.
fn segmentation(
    frame: &[u8],
    ip: Option<&Ip>,
    layout: Option<Layout>,
    mss: u16,
    max_frame: usize,
) -> Result<Option<Segmentation>, BadRequest> {
    let (Some(ip), Some(layout)) = (ip, layout) else {
        return Err(BadRequest::SegmentationNotTcp);
    };
    if layout.transport != Transport::Tcp {
        return Err(BadRequest::SegmentationNotTcp);
    }
    if mss == 0 {
        return Err(BadRequest::BadMss);
    }
    if ip.end != frame.len() {
        return Err(BadRequest::MalformedHeaders);
    }
    let start = layout.start();
    let tcp_header =
        usize::from(frame.get(start + 12).ok_or(BadRequest::MalformedHeaders)? >> 4) * 4;
    let headers_len = start + tcp_header;
    if !(TCP_MIN_HEADER..=TCP_MAX_HEADER).contains(&tcp_header)
        || headers_len > frame.len()
        || headers_len > MAX_SEGMENTATION_HEADERS
    {
        return Err(BadRequest::MalformedHeaders);
    }
    let payload_len = frame.len() - headers_len;
    if payload_len <= usize::from(mss) {
        return Ok(None);
    }
    if frame.len() < MIN_FRAME_LEN {
        return Err(BadRequest::BadMss);
    }
    if headers_len + usize::from(mss) > max_frame {
        return Err(BadRequest::SegmentTooLarge);
    }
    Ok(Some(Segmentation {
        layout,
        mss,
        headers_len,
        payload_len,
        segments: payload_len.div_ceil(usize::from(mss)),
        fin: frame[start + TCP_FLAGS] & TCP_FIN != 0,
    }))
}

/// Decides what to do with `frame` (already written) and its metadata. Frames longer than
/// `max_frame` (the MTU's) are only sendable as [`Request::Segment`].
pub(crate) fn classify(frame: &[u8], meta: TxMeta, max_frame: usize) -> Classified {
    let oversized = frame.len() > max_frame;
    let refuse = |bad| Classified {
        request: Request::Refuse(bad),
        ignored: None,
    };
    let Some((start, offset)) = meta.checksum else {
        return match (meta.tso_mss, oversized) {
            (Some(_), true) => refuse(BadRequest::SegmentationWithoutChecksum),
            (None, true) => refuse(BadRequest::OversizedWithoutSegmentation),
            (mss, false) => Classified {
                request: Request::Plain,
                ignored: mss.map(|_| BadRequest::SegmentationWithoutChecksum),
            },
        };
    };
    let (start, offset) = (usize::from(start), usize::from(offset));
    if start + offset + 2 > frame.len() {
        return refuse(BadRequest::ChecksumOutsideFrame);
    }
    let ip = parse_ip(frame);
    let layout = ip.as_ref().and_then(|ip| device_layout(ip, start, offset));
    let mut ignored = None;
    if let Some(mss) = meta.tso_mss {
        match segmentation(frame, ip.as_ref(), layout, mss, max_frame) {
            Ok(Some(segmentation)) => {
                return Classified {
                    request: Request::Segment(segmentation),
                    ignored: None,
                };
            }
            Ok(None) => {}
            Err(bad) if oversized => return refuse(bad),
            Err(bad) => ignored = Some(bad),
        }
    }
    if oversized {
        return refuse(BadRequest::OversizedWithoutSegmentation);
    }
    let field_end = start + offset + 2;
    let end = ip
        .as_ref()
        .map(|ip| ip.end)
        .filter(|end| *end >= field_end)
        .unwrap_or(frame.len());
    let request = match layout {
        // The device sums to the end of the frame, so trailing bytes beyond the IP packet
        // (and the padding of short frames, see the module docs) rule it out.
        Some(layout) if end == frame.len() && frame.len() >= MIN_FRAME_LEN => {
            Request::Checksum(layout)
        }
        _ => Request::Software(SoftwareChecksum {
            start,
            offset,
            end,
            udp: offset == UDP_CHECKSUM_OFFSET && ip.is_some_and(|ip| ip.protocol == PROTOCOL_UDP),
        }),
    };
    Classified { request, ignored }
}

/// Completes a CHECKSUM_PARTIAL checksum: the field holds the pseudo-header sum, so summing
/// `start..end` as is and complementing gives the checksum. Out-of-range positions are left
/// alone (the caller validated them).
pub(crate) fn complete_checksum(frame: &mut [u8], checksum: SoftwareChecksum) {
    let field = checksum.start + checksum.offset;
    if field + 2 > checksum.end || checksum.end > frame.len() {
        return;
    }
    let mut sum = !fold(add(0, &frame[checksum.start..checksum.end]));
    if checksum.udp && sum == 0 {
        sum = 0xFFFF;
    }
    put_be16(frame, field, sum);
}

/// `sum` with `length` taken out (one's-complement subtraction: adding the complement).
fn remove_length(sum: u16, length: u16) -> u16 {
    fold(u64::from(sum) + u64::from(!length))
}

/// `sum` with `length` added.
fn add_length(sum: u16, length: u16) -> u16 {
    fold(u64::from(sum) + u64::from(length))
}

/// Writes into `out` the header-only segment that carries `frame`'s FIN after the device sent
/// its payload (see the module docs), with a complete checksum. Returns its (padded) length.
fn write_fin_segment(frame: &[u8], segmentation: &Segmentation, out: &mut [u8]) -> Option<usize> {
    let layout = segmentation.layout;
    let (mac, start, headers) = (layout.mac_len, layout.start(), segmentation.headers_len);
    let wire_len = headers.max(MIN_FRAME_LEN);
    let out = out.get_mut(..wire_len)?;
    out[..headers].copy_from_slice(frame.get(..headers)?);
    out[headers..].fill(0);
    if layout.ipv4 {
        put_be16(out, mac + 2, (headers - mac) as u16);
        let id = be16(out, mac + 4)?.wrapping_add(segmentation.segments as u16);
        put_be16(out, mac + 4, id);
        put_be16(out, mac + 10, 0);
        let ip_checksum = !fold(add(0, &out[mac..start]));
        put_be16(out, mac + 10, ip_checksum);
    } else {
        put_be16(out, mac + 4, (headers - mac - IPV6_HEADER) as u16);
    }
    let sequence = u32::from_be_bytes(out.get(start + 4..start + 8)?.try_into().ok()?)
        .wrapping_add(segmentation.payload_len as u32);
    out[start + 4..start + 8].copy_from_slice(&sequence.to_be_bytes());
    // CWR belongs to the first segment only; FIN and PSH stay here, on the last one.
    out[start + TCP_FLAGS] &= !TCP_CWR;
    let field = start + TCP_CHECKSUM_OFFSET;
    let whole_length = (frame.len() - start) as u16;
    let pseudo = be16(out, field)?;
    let pseudo = add_length(
        remove_length(pseudo, whole_length),
        (headers - start) as u16,
    );
    put_be16(out, field, pseudo);
    complete_checksum(
        out,
        SoftwareChecksum {
            start,
            offset: TCP_CHECKSUM_OFFSET,
            end: headers,
            udp: false,
        },
    );
    Some(wire_len)
}

/// Rewrites a TSO frame's headers as the device wants them (pseudo-header sum without the
/// length, IP lengths and IPv4 header checksum zero) and, when it carries FIN, moves FIN and
/// PSH into a header-only segment written to `fin_area`. Returns that segment's length.
pub(crate) fn prepare_segmentation(
    frame: &mut [u8],
    segmentation: &Segmentation,
    fin_area: &mut [u8],
) -> Option<usize> {
    let layout = segmentation.layout;
    let (mac, start) = (layout.mac_len, layout.start());
    let fin_len = if segmentation.fin {
        let written = write_fin_segment(frame, segmentation, fin_area);
        // FIN leaves the TSO frame only once its own segment exists.
        if written.is_some()
            && let Some(flags) = frame.get_mut(start + TCP_FLAGS)
        {
            *flags &= !(TCP_FIN | TCP_PSH);
        }
        written
    } else {
        None
    };
    let field = start + TCP_CHECKSUM_OFFSET;
    if let Some(pseudo) = be16(frame, field) {
        put_be16(
            frame,
            field,
            remove_length(pseudo, (frame.len() - start) as u16),
        );
    }
    if layout.ipv4 {
        put_be16(frame, mac + 2, 0);
        put_be16(frame, mac + 10, 0);
    } else {
        put_be16(frame, mac + 4, 0);
    }
    fin_len
}

/// Context descriptor contents, without the slot index.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Context {
    vlan_macip_lens: u32,
    type_tucmd_mlhl: u32,
    mss_l4len: u32,
}

impl Context {
    fn new(layout: &Layout, mss: u16, l4_header_len: usize) -> Self {
        let mut command = ContextCommand::DEXT | ContextCommand::DTYP_CONTEXT;
        if layout.ipv4 {
            command |= ContextCommand::IPV4;
        }
        if layout.transport == Transport::Tcp {
            command |= ContextCommand::L4_TCP;
        }
        Context {
            vlan_macip_lens: (layout.ip_len as u32)
                | ((layout.mac_len as u32) << CONTEXT_MACLEN_SHIFT),
            type_tucmd_mlhl: command.bits(),
            mss_l4len: (u32::from(mss) << CONTEXT_MSS_SHIFT)
                | ((l4_header_len as u32) << CONTEXT_L4LEN_SHIFT),
        }
    }

    /// The context for checksum insertion only.
    pub(crate) fn checksum(layout: &Layout) -> Self {
        Context::new(layout, 0, 0)
    }

    /// The context for segmentation.
    pub(crate) fn segmentation(segmentation: &Segmentation) -> Self {
        let layout = &segmentation.layout;
        Context::new(
            layout,
            segmentation.mss,
            segmentation.headers_len - layout.start(),
        )
    }

    /// The descriptor that loads this context into slot `index`.
    pub(crate) fn descriptor(&self, index: usize) -> AdvancedTxContextDescriptor {
        AdvancedTxContextDescriptor {
            vlan_macip_lens: Le32::new(self.vlan_macip_lens),
            seqnum_seed: Le32::new(0),
            type_tucmd_mlhl: Le32::new(self.type_tucmd_mlhl),
            mss_l4len_idx: Le32::new(self.mss_l4len | ((index as u32) << CONTEXT_INDEX_SHIFT)),
        }
    }
}

/// What the ring needs to know to place a frame.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TxEnvironment {
    /// Bytes per slot buffer.
    pub chunk: usize,
    /// Largest frame without segmentation.
    pub max_frame: usize,
    /// The device may be asked for offloads at all ([`crate::Config::offloads`]).
    pub offloads: bool,
    /// Descriptor slots free for this frame.
    pub free_slots: usize,
    /// Context descriptors the device holds (as last written), per slot.
    pub loaded_contexts: [Option<[u64; 2]>; TX_CONTEXT_SLOTS],
}

/// What was done to a frame, for the driver's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TxOutcome {
    /// The device inserts a checksum (alone or while segmenting).
    pub checksum_offloaded: bool,
    /// The device segments the frame.
    pub segmented: bool,
    /// The driver completed the checksum itself.
    pub software_checksum: bool,
    /// FIN went into a separate header-only segment.
    pub fin_segment: bool,
    /// Metadata that could not be honoured (the frame still goes out unless `refused`).
    pub bad_request: Option<BadRequest>,
    /// The frame is not sent.
    pub refused: bool,
}

/// A frame ready for the ring: up to two device packets (a TSO frame and its FIN segment).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PreparedTransmit {
    pub packets: [Option<TxPacket>; 2],
    /// Packets handed to the device: a TSO frame counts once, as QEMU's VFGPTC counts it
    /// (`igb_on_tx_done_update_stats` runs once per packet), so driver and hardware counters
    /// agree on the test bed.
    pub device_packets: u16,
    /// Their bytes (without FCS).
    pub device_bytes: u32,
    pub outcome: TxOutcome,
}

impl PreparedTransmit {
    fn single(packet: TxPacket, outcome: TxOutcome) -> Self {
        PreparedTransmit {
            packets: [Some(packet), None],
            device_packets: 1,
            device_bytes: packet.len as u32,
            outcome,
        }
    }
}

fn plain_packet(len: usize) -> TxPacket {
    TxPacket {
        offset: 0,
        len,
        command: TxCommand::empty(),
        olinfo_status: (len as u32) << TX_PAYLEN_SHIFT,
        context: None,
    }
}

fn context_slots(environment: &TxEnvironment, index: usize, words: [u64; 2]) -> usize {
    usize::from(environment.loaded_contexts[index] != Some(words))
}

/// Turns a written frame (`area[..len]`, zero padded to 60 bytes) and its metadata into
/// device packets, completing checksums in software where the device cannot. A FIN segment
/// goes into `area` from chunk `len.div_ceil(chunk)` on, so frames above the MTU must come
/// with one more chunk of `area` and `len.div_ceil(chunk) + 2` free slots.
pub(crate) fn prepare_transmit(
    area: &mut [u8],
    len: usize,
    meta: TxMeta,
    environment: &TxEnvironment,
) -> PreparedTransmit {
    let wire_len = len.max(MIN_FRAME_LEN);
    let oversized = len > environment.max_frame;
    let mut outcome = TxOutcome::default();
    let Some(frame) = area.get(..len) else {
        outcome.refused = true;
        outcome.bad_request = Some(BadRequest::MalformedHeaders);
        return PreparedTransmit {
            outcome,
            ..PreparedTransmit::default()
        };
    };
    let classified = classify(frame, meta, environment.max_frame);
    outcome.bad_request = classified.ignored;
    let mut request = classified.request;
    if !environment.offloads {
        request = match request {
            Request::Checksum(layout) => Request::Software(software_for(&layout, len)),
            Request::Segment(segmentation) if !oversized => {
                outcome.bad_request = Some(BadRequest::SegmentTooLarge);
                Request::Software(software_for(&segmentation.layout, len))
            }
            Request::Segment(_) => Request::Refuse(BadRequest::OversizedWithoutSegmentation),
            other => other,
        };
    }
    let software = |area: &mut [u8], checksum: SoftwareChecksum, mut outcome: TxOutcome| {
        complete_checksum(&mut area[..len], checksum);
        outcome.software_checksum = true;
        PreparedTransmit::single(plain_packet(wire_len), outcome)
    };
    match request {
        Request::Plain => PreparedTransmit::single(plain_packet(wire_len), outcome),
        Request::Refuse(bad) => {
            outcome.refused = true;
            outcome.bad_request = Some(bad);
            PreparedTransmit {
                outcome,
                ..PreparedTransmit::default()
            }
        }
        Request::Software(checksum) => software(area, checksum, outcome),
        Request::Checksum(layout) => {
            let words = Context::checksum(&layout)
                .descriptor(CHECKSUM_CONTEXT)
                .to_words();
            let slots = context_slots(environment, CHECKSUM_CONTEXT, words)
                + len.div_ceil(environment.chunk);
            if slots > environment.free_slots {
                // No slot for the context descriptor: cheaper to sum 1.5 KiB than to refuse.
                return software(area, software_for(&layout, len), outcome);
            }
            outcome.checksum_offloaded = true;
            PreparedTransmit::single(
                TxPacket {
                    offset: 0,
                    len,
                    command: TxCommand::empty(),
                    olinfo_status: ((len as u32) << TX_PAYLEN_SHIFT)
                        | TxOffloadOptions::L4_CHECKSUM.bits()
                        | ((CHECKSUM_CONTEXT as u32) << TX_CONTEXT_INDEX_SHIFT),
                    context: Some((CHECKSUM_CONTEXT, words)),
                },
                outcome,
            )
        }
        Request::Segment(segmentation) => {
            let words = Context::segmentation(&segmentation)
                .descriptor(SEGMENTATION_CONTEXT)
                .to_words();
            let data_chunks = len.div_ceil(environment.chunk);
            let slots = context_slots(environment, SEGMENTATION_CONTEXT, words)
                + data_chunks
                + usize::from(segmentation.fin);
            let fin_offset = data_chunks * environment.chunk;
            let fin_room = if segmentation.fin {
                segmentation.headers_len.max(MIN_FRAME_LEN)
            } else {
                0
            };
            if slots > environment.free_slots || fin_offset + fin_room > area.len() {
                if oversized {
                    // The caller reserved enough for any segmentation; not reached.
                    outcome.refused = true;
                    return PreparedTransmit {
                        outcome,
                        ..PreparedTransmit::default()
                    };
                }
                // A frame within the MTU: sending it whole beats dropping it.
                outcome.bad_request = Some(BadRequest::SegmentTooLarge);
                return software(area, software_for(&segmentation.layout, len), outcome);
            }
            let (frame_area, fin_area) = area.split_at_mut(fin_offset);
            let fin_len = prepare_segmentation(&mut frame_area[..len], &segmentation, fin_area);
            let mut options = TxOffloadOptions::L4_CHECKSUM;
            if segmentation.layout.ipv4 {
                options |= TxOffloadOptions::IP_CHECKSUM;
            }
            outcome.checksum_offloaded = true;
            outcome.segmented = true;
            outcome.fin_segment = fin_len.is_some();
            let tso = TxPacket {
                offset: 0,
                len,
                command: TxCommand::TSE,
                olinfo_status: ((segmentation.payload_len as u32) << TX_PAYLEN_SHIFT)
                    | options.bits()
                    | ((SEGMENTATION_CONTEXT as u32) << TX_CONTEXT_INDEX_SHIFT),
                context: Some((SEGMENTATION_CONTEXT, words)),
            };
            let fin = fin_len.map(|fin_len| TxPacket {
                offset: fin_offset,
                ..plain_packet(fin_len)
            });
            PreparedTransmit {
                packets: [Some(tso), fin],
                device_packets: 1 + u16::from(fin.is_some()),
                device_bytes: (len + fin.map_or(0, |fin| fin.len)) as u32,
                outcome,
            }
        }
    }
}

fn software_for(layout: &Layout, len: usize) -> SoftwareChecksum {
    SoftwareChecksum {
        start: layout.start(),
        offset: match layout.transport {
            Transport::Tcp => TCP_CHECKSUM_OFFSET,
            Transport::Udp => UDP_CHECKSUM_OFFSET,
        },
        end: len,
        udp: layout.transport == Transport::Udp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use net_device::checksum::reference as reference_sum;

    #[test]
    fn removing_and_adding_a_length_is_one_s_complement_arithmetic() {
        for (sum, length) in [
            (0x1234u16, 0x0034u16),
            (0x0000, 0x0001),
            (0xFFFF, 0xFFFE),
            (0x8000, 0x8000),
        ] {
            let removed = remove_length(sum, length);
            // Adding the length back gives the original sum (0 and 0xFFFF are the same number).
            let back = add_length(removed, length);
            assert!(
                back == sum || (back | sum) == 0xFFFF && (back & sum) == 0,
                "{sum:#x} {length:#x}"
            );
        }
        // Against the reference: pseudo header words with and without the length word.
        let words = [0xC0A8u16, 0x0001, 0xC0A8, 0x0002, 0x0006];
        let bytes: alloc::vec::Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        let without = reference_sum(&bytes);
        let mut with_length = bytes.clone();
        with_length.extend_from_slice(&1480u16.to_be_bytes());
        assert_eq!(remove_length(reference_sum(&with_length), 1480), without);
    }

    #[test]
    fn a_frame_cut_short_of_its_headers_is_classified_without_panicking() {
        let meta = TxMeta {
            checksum: Some((34, 16)),
            tso_mss: Some(1448),
        };
        for len in 0..80 {
            let mut frame = alloc::vec![0u8; len];
            if len >= 14 {
                frame[12] = 0x08;
            }
            if len > 14 {
                frame[14] = 0x45;
            }
            let classified = classify(&frame, meta, 1518);
            if len < 52 {
                assert_eq!(
                    classified.request,
                    Request::Refuse(BadRequest::ChecksumOutsideFrame)
                );
            }
        }
    }
}
