//! Software receive coalescing (GRO): consecutive in-order TCP segments of one flow, received in
//! one batch, become one large frame before smoltcp sees them.
//!
//! Every segment costs smoltcp a full trip (parsing, socket lookup, the TCP state machine, the
//! copy into the socket buffer); most paths (the VF, netvsc, virtio-net without GUEST_TSO) hand
//! the guest MTU-sized segments. The bond offers every frame that passed its checks and the
//! duplicate window to the [`Coalescer`]; at the end of each receive batch it calls
//! [`Coalescer::flush`], so nothing waits for a later batch and latency does not change.
//!
//! A segment is appended to the frame held for its flow only when:
//! * same MACs, IP version, addresses and ports (the flow key), and the same IPv4 TOS, TTL and
//!   DF bit (IPv6: traffic class, flow label and hop limit), so ECN marks are never lost;
//! * no IPv4 options and not a fragment (IPv6: no extension headers);
//! * flags ACK or ACK+PSH only (a PSH segment is appended and then ends the merge);
//! * the same acknowledgement number;
//! * its sequence number continues the held frame exactly;
//! * TCP options byte for byte identical, except the timestamp option, whose TSval and TSecr
//!   must not go backwards (the held frame keeps the first segment's: RFC 7323 §4.3 has an ACK
//!   covering several segments echo the earliest);
//! * the result stays a valid IP packet (≤ 65 535 bytes of IPv4 packet or IPv6 payload).
//!
//! The bond only offers frames whose checksums were verified (by the NIC or in software); the
//! merged frame's TCP checksum field is therefore not recomputed (smoltcp is told the bond
//! checks TCP checksums), its IPv4 header checksum is. The merged frame carries the last
//! segment's window.
//!
//! SYN, FIN, RST, URG, ECE and CWR segments, segments without payload and out-of-order
//! segments are never merged: they flush their flow's held frame first, so the order of the
//! segments within a flow never changes. The coalescer remembers, per flow, where the sequence
//! space should continue, across batches: after a hole (a lost segment) every segment of that
//! flow goes to smoltcp on its own until a segment fills the hole, so the sender still gets one
//! duplicate ACK per segment and its fast retransmit works. VLAN-tagged frames pass untouched.
//! Every header field is read with bounds checks; a frame whose lengths or fields lie is passed
//! on as it is (smoltcp drops it), never merged.

use alloc::vec::Vec;

const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const PROTOCOL_TCP: u8 = 6;
const PROTOCOL_UDP: u8 = 17;
const PROTOCOL_ICMPV6: u8 = 58;
const TCP_HEADER: usize = 20;
/// Largest IPv4 packet or IPv6 payload: what the IP length fields can describe.
const MAX_IP_LENGTH: usize = 65_535;
/// Largest frame the coalescer builds (Ethernet header + the largest IPv4 packet; an IPv6
/// frame may be 40 bytes longer, the header not counting in its payload length).
pub(crate) const MAX_COALESCED_FRAME: usize = ETHERNET_HEADER + IPV6_HEADER + MAX_IP_LENGTH;
/// Largest frame that starts a merge: an MTU-sized (or jumbo) segment. Larger ones are a
/// host's coalesced frames already; holding them would only pin 64 KiB buffers.
const MAX_HELD_START: usize = 9216 + ETHERNET_HEADER;
/// Flows remembered at once (held frames and sequence tracking).
const MAX_FLOWS: usize = 16;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;
/// Flags that end or change a connection's state, or mark a segment specially.
const NEVER_MERGED: u8 = FIN | SYN | RST | URG | ECE | CWR;

const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_TIMESTAMP: u8 = 8;
const OPTION_TIMESTAMP_LEN: usize = 10;

/// Where frames go: the bond's receive queue, or a test's list.
pub(crate) trait Delivery {
    /// An empty buffer for a frame of `len` bytes (pooled when possible).
    fn buffer(&mut self, len: usize) -> Vec<u8>;
    /// An empty buffer of [`MAX_COALESCED_FRAME`] bytes for a merged frame; `None` when memory
    /// is short (the merge is refused, nothing is lost).
    fn large_buffer(&mut self) -> Option<Vec<u8>>;
    /// Hands a complete frame to the stack.
    fn deliver(&mut self, frame: Vec<u8>);
    /// Takes back a buffer that is no longer needed.
    fn recycle(&mut self, buffer: Vec<u8>);
}

/// Coalescing counters (monotonic).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct CoalesceStats {
    /// Segments that went into merged frames (a frame built from n segments counts n).
    pub segments_merged: u64,
    /// Merged frames (two segments or more) handed to the stack.
    pub merged_frames: u64,
    /// TCP segments not merged because of their flags (SYN, FIN, RST, URG, ECE, CWR).
    pub refused_flags: u64,
    /// TCP segments without payload (pure ACKs, window updates).
    pub refused_no_payload: u64,
    /// Segments whose sequence number did not continue their flow (holes, retransmissions,
    /// and every segment while a hole is open).
    pub refused_out_of_order: u64,
    /// IPv4 options, IPv4 fragments or IPv6 extension headers.
    pub refused_ip_options: u64,
    /// IP header fields (TOS/ECN, TTL, DF, flow label) or the acknowledgement number differ
    /// from the held frame's.
    pub refused_header_mismatch: u64,
    /// TCP options differ from the held frame's, or its timestamps went backwards.
    pub refused_tcp_options: u64,
    /// Appending would pass the 64 KiB limit of an IP packet.
    pub refused_size: u64,
    /// No memory for a 64 KiB frame.
    pub refused_memory: u64,
    /// Frames whose lengths or header fields do not add up (passed on as they are).
    pub refused_malformed: u64,
    /// VLAN-tagged frames (passed on untouched).
    pub vlan_passed: u64,
    /// Held frames flushed early because the flow table was full.
    pub flow_evictions: u64,
}

/// Why a segment was not appended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Refusal {
    Flags,
    NoPayload,
    OutOfOrder,
    IpOptions,
    HeaderMismatch,
    TcpOptions,
    Size,
    Memory,
}

impl CoalesceStats {
    fn count(&mut self, refusal: Refusal) {
        let counter = match refusal {
            Refusal::Flags => &mut self.refused_flags,
            Refusal::NoPayload => &mut self.refused_no_payload,
            Refusal::OutOfOrder => &mut self.refused_out_of_order,
            Refusal::IpOptions => &mut self.refused_ip_options,
            Refusal::HeaderMismatch => &mut self.refused_header_mismatch,
            Refusal::TcpOptions => &mut self.refused_tcp_options,
            Refusal::Size => &mut self.refused_size,
            Refusal::Memory => &mut self.refused_memory,
        };
        *counter += 1;
    }
}

/// MACs, IP version, addresses and ports, as machine words: compared for every frame, and a
/// few integer compares are much cheaper under an emulated CPU (QEMU TCG) than the `memcmp`
/// calls or vector compares byte arrays become.
#[derive(Clone, Copy, Debug)]
struct FlowKey {
    /// Source then destination port.
    ports: u32,
    /// Source then destination address (IPv4: the first word, the rest zero), IPv6 marked by
    /// the version in `destination_and_version`.
    addresses: [u64; 4],
    /// Destination MAC (48 bits) and the IP version.
    destination_and_version: u64,
    /// Source MAC (48 bits).
    source: u64,
}

impl FlowKey {
    fn same(&self, other: &FlowKey) -> bool {
        // Branch-free on purpose: no early exits for the compiler to merge into `memcmp`.
        ((self.ports ^ other.ports) as u64
            | (self.addresses[0] ^ other.addresses[0])
            | (self.addresses[1] ^ other.addresses[1])
            | (self.addresses[2] ^ other.addresses[2])
            | (self.addresses[3] ^ other.addresses[3])
            | (self.destination_and_version ^ other.destination_and_version)
            | (self.source ^ other.source))
            == 0
    }
}

/// The big-endian word of the 8 bytes at `offset` (the caller checked they exist).
fn word(frame: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&frame[offset..offset + 8]);
    u64::from_be_bytes(bytes)
}

/// The 48-bit MAC at `offset` (the caller checked it exists).
fn mac(frame: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[2..].copy_from_slice(&frame[offset..offset + 6]);
    u64::from_be_bytes(bytes)
}

/// A TCP segment's header fields, all checked against the frame's length.
#[derive(Clone, Copy, Debug)]
struct Segment {
    key: FlowKey,
    ipv6: bool,
    /// Offset of the TCP header.
    tcp: usize,
    /// Offset of the payload.
    payload: usize,
    /// One past the last byte of the IP packet (Ethernet padding excluded).
    end: usize,
    sequence: u32,
    acknowledgement: u32,
    flags: u8,
    /// IPv4 options present, a fragment, or reserved TCP bits set: never merged.
    ip_options: bool,
    /// Offset of the timestamp option's TSval in the frame, if the options hold one.
    timestamp: Option<usize>,
}

impl Segment {
    fn payload_len(&self) -> usize {
        self.end - self.payload
    }

    /// Sequence space the segment takes (SYN and FIN count one each).
    fn sequence_len(&self) -> u32 {
        self.payload_len() as u32
            + u32::from(self.flags & SYN != 0)
            + u32::from(self.flags & FIN != 0)
    }
}

fn be16(frame: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *frame.get(offset)?,
        *frame.get(offset + 1)?,
    ]))
}

fn be32(frame: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        frame.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// What a frame is, as far as coalescing goes.
enum Parsed {
    /// A TCP segment (possibly not mergeable by itself: see its fields).
    Tcp(Segment),
    /// Tagged, not IP, or IP but not TCP: passes without touching any flow.
    Other { vlan: bool },
    /// IP that may carry TCP we cannot attribute to a flow (IPv6 extension headers): every
    /// held frame goes first, so no flow's order can change.
    Unattributable,
    /// An IPv4/IPv6 TCP frame whose lengths or header fields lie.
    Malformed,
}

/// Timestamp option offset (of TSval) within `options` (which start at `start` in the frame);
/// `Err` when the option list is malformed.
fn find_timestamp(frame: &[u8], start: usize, end: usize) -> Result<Option<usize>, ()> {
    let mut at = start;
    while at < end {
        let kind = frame[at];
        match kind {
            OPTION_END => return Ok(None),
            OPTION_NOP => at += 1,
            _ => {
                let len = usize::from(*frame.get(at + 1).ok_or(())?);
                if len < 2 || at + len > end {
                    return Err(());
                }
                if kind == OPTION_TIMESTAMP {
                    if len != OPTION_TIMESTAMP_LEN {
                        return Err(());
                    }
                    return Ok(Some(at + 2));
                }
                at += len;
            }
        }
    }
    Ok(None)
}

fn parse(frame: &[u8]) -> Parsed {
    let Some(ethertype) = be16(frame, 12) else {
        return Parsed::Other { vlan: false };
    };
    let ip = ETHERNET_HEADER;
    // `be16` above proved the frame holds both MACs.
    let mut key = FlowKey {
        ports: 0,
        addresses: [0; 4],
        destination_and_version: mac(frame, 0),
        source: mac(frame, 6),
    };
    let (tcp, end, ip_options) = match ethertype {
        ETHERTYPE_VLAN | ETHERTYPE_QINQ => return Parsed::Other { vlan: true },
        ETHERTYPE_IPV4 => {
            let Some(&version_ihl) = frame.get(ip) else {
                return Parsed::Malformed;
            };
            let Some(&protocol) = frame.get(ip + 9) else {
                return Parsed::Malformed;
            };
            if protocol != PROTOCOL_TCP {
                return Parsed::Other { vlan: false };
            }
            let header_len = usize::from(version_ihl & 0x0f) * 4;
            let (Some(total_len), Some(fragment)) = (be16(frame, ip + 2), be16(frame, ip + 6))
            else {
                return Parsed::Malformed;
            };
            let total_len = usize::from(total_len);
            if version_ihl >> 4 != 4
                || header_len < IPV4_HEADER
                || total_len < header_len + TCP_HEADER
                || ip + total_len > frame.len()
            {
                return Parsed::Malformed;
            }
            key.addresses[0] = word(frame, ip + 12);
            // More-fragments or a fragment offset: a piece of a segment, whose sequence space
            // cannot be followed.
            if fragment & 0x3fff != 0 {
                return Parsed::Unattributable;
            }
            (ip + header_len, ip + total_len, header_len != IPV4_HEADER)
        }
        ETHERTYPE_IPV6 => {
            let (Some(&version), Some(payload_len), Some(&next_header)) =
                (frame.get(ip), be16(frame, ip + 4), frame.get(ip + 6))
            else {
                return Parsed::Malformed;
            };
            match next_header {
                PROTOCOL_TCP => {}
                PROTOCOL_UDP | PROTOCOL_ICMPV6 => return Parsed::Other { vlan: false },
                _ => return Parsed::Unattributable,
            }
            let payload_len = usize::from(payload_len);
            let tcp = ip + IPV6_HEADER;
            if version >> 4 != 6 || payload_len < TCP_HEADER || tcp + payload_len > frame.len() {
                return Parsed::Malformed;
            }
            key.destination_and_version |= 6 << 56;
            for (index, address) in key.addresses.iter_mut().enumerate() {
                *address = word(frame, ip + 8 + 8 * index);
            }
            (tcp, tcp + payload_len, false)
        }
        _ => return Parsed::Other { vlan: false },
    };
    // `end - tcp >= TCP_HEADER` was checked above, so the fixed header is in the frame.
    let data_offset = usize::from(frame[tcp + 12] >> 4) * 4;
    let payload = tcp + data_offset;
    if data_offset < TCP_HEADER || payload > end {
        return Parsed::Malformed;
    }
    let Ok(timestamp) = find_timestamp(frame, tcp + TCP_HEADER, payload) else {
        return Parsed::Malformed;
    };
    key.ports = u32::from_be_bytes([frame[tcp], frame[tcp + 1], frame[tcp + 2], frame[tcp + 3]]);
    let (Some(sequence), Some(acknowledgement)) = (be32(frame, tcp + 4), be32(frame, tcp + 8))
    else {
        return Parsed::Malformed;
    };
    // The low nibble of byte 12 holds reserved bits and the old ECN nonce: unknown meaning,
    // never merged.
    let reserved = frame[tcp + 12] & 0x0f != 0;
    Parsed::Tcp(Segment {
        key,
        ipv6: ethertype == ETHERTYPE_IPV6,
        tcp,
        payload,
        end,
        sequence,
        acknowledgement,
        flags: frame[tcp + 13],
        ip_options: ip_options || reserved,
        timestamp,
    })
}

/// `a` is at or after `b` in sequence space.
fn not_before(a: u32, b: u32) -> bool {
    a.wrapping_sub(b) < 0x8000_0000
}

/// A frame being built from segments of one flow.
struct Held {
    frame: Vec<u8>,
    segments: u32,
    /// Sequence number after the last appended byte.
    next_sequence: u32,
    /// The last appended segment's TSval and TSecr (the frame keeps the first segment's).
    timestamps: Option<(u32, u32)>,
    /// Offset of TSval from the TCP header, when the segments carry timestamps.
    timestamp_at: Option<usize>,
    /// Offsets within `frame`, for the fix-ups at flush.
    tcp: usize,
    payload: usize,
    ipv6: bool,
    /// The first segment's headers as words, and which of their bits must match in every
    /// appended segment (all but lengths, IPv4 ID and checksum, sequence number, PSH, window,
    /// TCP checksum and timestamps): the fast path of [`Coalescer::offer`].
    template: Template,
}

/// Header words (big-endian, 8 bytes each, zero past the headers) and their compare masks.
struct Template {
    words: [u64; TEMPLATE_WORDS],
    masks: [u64; TEMPLATE_WORDS],
    /// Words in use: the headers' length in words, rounded up.
    used: usize,
}

/// Ethernet + IPv6 + the longest TCP header: 134 bytes.
const TEMPLATE_WORDS: usize = (ETHERNET_HEADER + IPV6_HEADER + 60).div_ceil(8);

/// The `index`th header word of `frame`, bytes at or past `end` read as zero.
///
/// Whole words are loaded at once and a partial one byte by byte: copying a variable-length
/// part into an array would call `memcpy` for every word, which costs more than the rest of
/// the comparison under an emulated CPU.
fn header_word(frame: &[u8], index: usize, end: usize) -> u64 {
    let start = index * 8;
    if start + 8 <= end
        && let Some(Ok(bytes)) = frame.get(start..start + 8).map(<[u8; 8]>::try_from)
    {
        return u64::from_be_bytes(bytes);
    }
    let stop = end.min(start + 8).min(frame.len());
    let part = frame.get(start..stop).unwrap_or_default();
    let word = part
        .iter()
        .fold(0u64, |word, &byte| word << 8 | u64::from(byte));
    // The bytes read sit at the top of the word, as in the frame; the rest are zero.
    word.checked_shl(8 * (8 - part.len() as u32)).unwrap_or(0)
}

impl Template {
    fn new(frame: &[u8], segment: &Segment) -> Template {
        let end = segment.payload;
        let used = end.div_ceil(8);
        let mut masks = [0u64; TEMPLATE_WORDS];
        let mut words = [0u64; TEMPLATE_WORDS];
        let mut mask_bytes = [0u8; TEMPLATE_WORDS * 8];
        mask_bytes[..end].fill(0xff);
        let mut ignore = |from: usize, to: usize| mask_bytes[from..to].fill(0);
        let ip = ETHERNET_HEADER;
        if segment.ipv6 {
            ignore(ip + 4, ip + 6); // payload length
        } else {
            ignore(ip + 2, ip + 6); // total length, identification
            ignore(ip + 10, ip + 12); // header checksum
        }
        let tcp = segment.tcp;
        ignore(tcp + 4, tcp + 8); // sequence number: checked on its own
        ignore(tcp + 14, tcp + 18); // window, checksum
        if let Some(at) = segment.timestamp {
            ignore(at, at + 8); // TSval, TSecr: checked on their own
        }
        mask_bytes[tcp + 13] = !PSH;
        for index in 0..used {
            let mut mask = [0u8; 8];
            mask.copy_from_slice(&mask_bytes[index * 8..index * 8 + 8]);
            masks[index] = u64::from_be_bytes(mask);
            words[index] = header_word(frame, index, end) & masks[index];
        }
        Template { words, masks, used }
    }

    /// True when `frame`'s headers match outside the masked-out fields.
    fn matches(&self, frame: &[u8], end: usize) -> bool {
        let mut differ = 0;
        for index in 0..self.used {
            differ |= (header_word(frame, index, end) & self.masks[index]) ^ self.words[index];
        }
        differ == 0
    }
}

struct Flow {
    key: FlowKey,
    /// A data segment (or SYN) has been seen: `next_sequence` means something.
    known: bool,
    /// Where the flow's sequence space continues (after the highest segment seen).
    next_sequence: u32,
    /// Start of a hole (the first missing byte) while one is open.
    hole: Option<u32>,
    /// Recency, for eviction.
    last_used: u64,
    held: Option<Held>,
}

/// The coalescer; see the module documentation.
pub(crate) struct Coalescer {
    flows: Vec<Flow>,
    clock: u64,
    /// The flow of the previous TCP segment.
    last_flow: usize,
    /// Try [`Coalescer::append_fast`] first (tests compare the results with it off).
    fast_path: bool,
    /// Segments the fast path appended.
    #[cfg(test)]
    fast_appends: u64,
    pub(crate) stats: CoalesceStats,
}

impl Coalescer {
    pub(crate) fn new() -> Coalescer {
        Coalescer {
            flows: Vec::with_capacity(MAX_FLOWS),
            clock: 0,
            last_flow: 0,
            fast_path: true,
            #[cfg(test)]
            fast_appends: 0,
            stats: CoalesceStats::default(),
        }
    }

    /// Takes one received frame (checksums verified, not a duplicate): appends it to its
    /// flow's held frame, holds it to append later ones, or delivers it now (after its flow's
    /// held frame).
    pub(crate) fn offer(&mut self, frame: &[u8], out: &mut dyn Delivery) {
        self.clock += 1;
        if self.fast_path && self.append_fast(frame, out) {
            #[cfg(test)]
            {
                self.fast_appends += 1;
            }
            return;
        }
        let segment = match parse(frame) {
            Parsed::Tcp(segment) => segment,
            Parsed::Other { vlan } => {
                self.stats.vlan_passed += u64::from(vlan);
                return pass(frame, out);
            }
            Parsed::Unattributable => {
                self.stats.refused_ip_options += 1;
                self.flush(out);
                return pass(frame, out);
            }
            Parsed::Malformed => {
                self.stats.refused_malformed += 1;
                self.flush(out);
                return pass(frame, out);
            }
        };
        let index = self.flow_index(&segment.key, out);
        let clock = self.clock;
        let Coalescer { flows, stats, .. } = self;
        let flow = &mut flows[index];
        flow.last_used = clock;

        let refusal = if segment.flags & (SYN | RST) != 0 {
            // A new connection, or the end of this one: start afresh.
            flow.known = segment.flags & SYN != 0;
            flow.hole = None;
            flow.next_sequence = segment.sequence.wrapping_add(segment.sequence_len());
            Some(Refusal::Flags)
        } else if segment.payload_len() == 0 && segment.flags & FIN == 0 {
            Some(Refusal::NoPayload)
        } else {
            let in_order = track(flow, &segment);
            if !in_order {
                Some(Refusal::OutOfOrder)
            } else if segment.flags & NEVER_MERGED != 0 || segment.flags & ACK == 0 {
                Some(Refusal::Flags)
            } else if segment.ip_options {
                Some(Refusal::IpOptions)
            } else {
                None
            }
        };
        if let Some(refusal) = refusal {
            stats.count(refusal);
            if let Some(held) = flow.held.take() {
                finish(held, stats, out);
            }
            return pass(frame, out);
        }

        if let Some(held) = flow.held.as_mut() {
            match append(held, frame, &segment, out) {
                Ok(()) => {
                    if segment.flags & PSH != 0
                        && let Some(held) = flow.held.take()
                    {
                        finish(held, stats, out);
                    }
                    return;
                }
                Err(refusal) => {
                    stats.count(refusal);
                    if let Some(held) = flow.held.take() {
                        finish(held, stats, out);
                    }
                }
            }
        }
        if segment.flags & PSH != 0 || segment.end > MAX_HELD_START {
            // It would end the merge at once, or it is already large (a host's coalesced
            // frame): nothing to hold it for.
            return pass(frame, out);
        }
        flow.held = Some(hold(frame, &segment, out));
    }

    /// The common case, cheaply: `frame` continues the frame held for the previous segment's
    /// flow. Its headers are compared word by word with the held frame's first segment, so
    /// only the fields that may differ are looked at on their own; anything unusual returns
    /// false and takes the full path, which decides exactly as if this did not exist.
    fn append_fast(&mut self, frame: &[u8], out: &mut dyn Delivery) -> bool {
        let clock = self.clock;
        let Coalescer {
            flows,
            stats,
            last_flow,
            ..
        } = self;
        let Some(flow) = flows.get_mut(*last_flow) else {
            return false;
        };
        let Some(held) = flow.held.as_mut() else {
            return false;
        };
        let header_end = held.payload;
        if frame.len() <= header_end || !held.template.matches(frame, header_end) {
            return false;
        }
        // Same ethertype, IHL and data offset as the held frame (the template says so): the
        // length field alone says where this packet ends.
        let ip = ETHERNET_HEADER;
        let end = if held.ipv6 {
            be16(frame, ip + 4).map(|length| ip + IPV6_HEADER + usize::from(length))
        } else {
            be16(frame, ip + 2).map(|length| ip + usize::from(length))
        };
        let Some(end) = end.filter(|&end| end > header_end && end <= frame.len()) else {
            return false;
        };
        let tcp = held.tcp;
        let Some(sequence) = be32(frame, tcp + 4) else {
            return false;
        };
        let payload_len = end - header_end;
        let new_timestamps = match held.timestamp_at {
            Some(at) => match (timestamps(frame, tcp + at), held.timestamps) {
                (Some((tsval, tsecr)), Some((old_tsval, old_tsecr)))
                    if not_before(tsval, old_tsval) && not_before(tsecr, old_tsecr) =>
                {
                    Some((tsval, tsecr))
                }
                _ => return false,
            },
            None => None,
        };
        let ip_length = held.frame.len() - ip - if held.ipv6 { IPV6_HEADER } else { 0 };
        if sequence != held.next_sequence
            || sequence != flow.next_sequence
            || flow.hole.is_some()
            || ip_length + payload_len > MAX_IP_LENGTH
        {
            return false;
        }
        if held.frame.capacity() < held.frame.len() + payload_len {
            let Some(mut large) = out.large_buffer() else {
                return false;
            };
            large.clear();
            large.extend_from_slice(&held.frame);
            out.recycle(core::mem::replace(&mut held.frame, large));
        }
        held.frame.extend_from_slice(&frame[header_end..end]);
        held.segments += 1;
        held.next_sequence = sequence.wrapping_add(payload_len as u32);
        held.timestamps = new_timestamps;
        held.frame[tcp + 14..tcp + 16].copy_from_slice(&frame[tcp + 14..tcp + 16]);
        let push = frame[tcp + 13] & PSH;
        held.frame[tcp + 13] |= push;
        flow.next_sequence = held.next_sequence;
        flow.last_used = clock;
        if push != 0
            && let Some(held) = flow.held.take()
        {
            finish(held, stats, out);
        }
        true
    }

    /// Delivers every held frame (the end of a receive batch).
    pub(crate) fn flush(&mut self, out: &mut dyn Delivery) {
        let Coalescer { flows, stats, .. } = self;
        for flow in flows.iter_mut() {
            if let Some(held) = flow.held.take() {
                finish(held, stats, out);
            }
        }
    }

    /// The flow table entry for `key`, created if needed (evicting the least recently used).
    fn flow_index(&mut self, key: &FlowKey, out: &mut dyn Delivery) -> usize {
        // A bulk transfer's segments come in runs: look where the previous one went first.
        if self
            .flows
            .get(self.last_flow)
            .is_some_and(|flow| flow.key.same(key))
        {
            return self.last_flow;
        }
        let index = self.find_or_insert(key, out);
        self.last_flow = index;
        index
    }

    fn find_or_insert(&mut self, key: &FlowKey, out: &mut dyn Delivery) -> usize {
        if let Some(index) = self.flows.iter().position(|flow| flow.key.same(key)) {
            return index;
        }
        let fresh = Flow {
            key: *key,
            known: false,
            next_sequence: 0,
            hole: None,
            last_used: 0,
            held: None,
        };
        if self.flows.len() < MAX_FLOWS {
            self.flows.push(fresh);
            return self.flows.len() - 1;
        }
        let index = (0..self.flows.len())
            .min_by_key(|&index| self.flows[index].last_used)
            .unwrap_or(0);
        let old = core::mem::replace(&mut self.flows[index], fresh);
        if let Some(held) = old.held {
            self.stats.flow_evictions += 1;
            finish(held, &mut self.stats, out);
        }
        index
    }
}

/// Follows the flow's sequence space; true when the segment continues it with no hole open.
fn track(flow: &mut Flow, segment: &Segment) -> bool {
    let start = segment.sequence;
    let end = start.wrapping_add(segment.sequence_len());
    if !flow.known {
        // First sight of the flow: the segment sets where it stands.
        flow.known = true;
        flow.hole = None;
        flow.next_sequence = end;
        return true;
    }
    let expected = flow.next_sequence;
    if let Some(hole) = flow.hole
        && not_before(hole, start)
        && !not_before(hole, end)
    {
        // The missing bytes (some of them) arrived: back to normal after this segment.
        flow.hole = None;
        if not_before(end, expected) {
            flow.next_sequence = end;
        }
        return false;
    }
    if start == expected {
        flow.next_sequence = end;
        return flow.hole.is_none();
    }
    if not_before(start, expected) {
        // Bytes are missing before this segment.
        flow.hole.get_or_insert(expected);
        flow.next_sequence = end;
    }
    // Otherwise a retransmission of bytes already seen.
    false
}

/// Starts a held frame from a segment (Ethernet padding dropped).
fn hold(frame: &[u8], segment: &Segment, out: &mut dyn Delivery) -> Held {
    // Frame-sized: most held segments are never appended to (the last of a batch, a lone
    // segment of a slow flow); the first append moves the frame to a 64 KiB buffer.
    let mut buffer = out.buffer(segment.end);
    buffer.clear();
    buffer.extend_from_slice(&frame[..segment.end]);
    Held {
        frame: buffer,
        segments: 1,
        next_sequence: segment.sequence.wrapping_add(segment.payload_len() as u32),
        timestamps: segment.timestamp.and_then(|at| timestamps(frame, at)),
        timestamp_at: segment.timestamp.map(|at| at - segment.tcp),
        tcp: segment.tcp,
        payload: segment.payload,
        ipv6: segment.ipv6,
        template: Template::new(frame, segment),
    }
}

fn timestamps(frame: &[u8], at: usize) -> Option<(u32, u32)> {
    Some((be32(frame, at)?, be32(frame, at + 4)?))
}

/// Appends `segment` (of `frame`) to `held` when every rule allows it.
fn append(
    held: &mut Held,
    frame: &[u8],
    segment: &Segment,
    out: &mut dyn Delivery,
) -> Result<(), Refusal> {
    let first = &held.frame;
    if segment.sequence != held.next_sequence {
        return Err(Refusal::OutOfOrder);
    }
    let ip = ETHERNET_HEADER;
    // Both frames were parsed, so their IP headers are there.
    let ip_fields_equal = if segment.ipv6 {
        // Version, traffic class, flow label; hop limit.
        be32(first, ip) == be32(frame, ip) && first[ip + 7] == frame[ip + 7]
    } else {
        // TOS (with ECN), DF, TTL.
        first[ip + 1] == frame[ip + 1]
            && first[ip + 6] & 0x40 == frame[ip + 6] & 0x40
            && first[ip + 8] == frame[ip + 8]
    };
    if !ip_fields_equal || be32(first, held.tcp + 8) != Some(segment.acknowledgement) {
        return Err(Refusal::HeaderMismatch);
    }
    // Same TCP header length and the same options, timestamps aside.
    if segment.payload - segment.tcp != held.payload - held.tcp {
        return Err(Refusal::TcpOptions);
    }
    let options_first = &first[held.tcp + TCP_HEADER..held.payload];
    let options_new = &frame[segment.tcp + TCP_HEADER..segment.payload];
    let new_timestamps = segment.timestamp.and_then(|at| timestamps(frame, at));
    let same_options = match (segment.timestamp, held.timestamps, new_timestamps) {
        (None, None, None) => same_bytes(options_first, options_new, None),
        (Some(at), Some((tsval, tsecr)), Some((new_tsval, new_tsecr))) => {
            // TSval's offset within the options; the option ends 8 bytes later (parse checked).
            let relative = at - segment.tcp - TCP_HEADER;
            held.timestamp_at == Some(at - segment.tcp)
                && same_bytes(options_first, options_new, Some(relative..relative + 8))
                && not_before(new_tsval, tsval)
                && not_before(new_tsecr, tsecr)
        }
        _ => false,
    };
    if !same_options {
        return Err(Refusal::TcpOptions);
    }
    let payload = &frame[segment.payload..segment.end];
    let ip_length = held.frame.len() - ETHERNET_HEADER - if held.ipv6 { IPV6_HEADER } else { 0 };
    if ip_length + payload.len() > MAX_IP_LENGTH {
        return Err(Refusal::Size);
    }
    if held.frame.capacity() < held.frame.len() + payload.len() {
        let mut large = out.large_buffer().ok_or(Refusal::Memory)?;
        large.clear();
        large.extend_from_slice(&held.frame);
        out.recycle(core::mem::replace(&mut held.frame, large));
    }
    held.frame.extend_from_slice(payload);
    held.segments += 1;
    held.next_sequence = held.next_sequence.wrapping_add(payload.len() as u32);
    held.timestamps = new_timestamps;
    // The latest window and PSH (the only flags a mergeable segment has besides ACK).
    let window = segment.tcp + 14;
    held.frame[held.tcp + 14..held.tcp + 16].copy_from_slice(&frame[window..window + 2]);
    held.frame[held.tcp + 13] |= segment.flags & PSH;
    Ok(())
}

/// True when `a` and `b` (of equal length) hold the same bytes outside `except`. A plain loop:
/// TCP options are a few bytes, too short for a `memcmp` call to pay off.
fn same_bytes(a: &[u8], b: &[u8], except: Option<core::ops::Range<usize>>) -> bool {
    let mut differ = 0u8;
    for (index, (x, y)) in a.iter().zip(b).enumerate() {
        if !except.as_ref().is_some_and(|range| range.contains(&index)) {
            differ |= x ^ y;
        }
    }
    a.len() == b.len() && differ == 0
}

/// Fixes the lengths of a held frame and delivers it.
fn finish(mut held: Held, stats: &mut CoalesceStats, out: &mut dyn Delivery) {
    if held.segments > 1 {
        let ip = ETHERNET_HEADER;
        let frame = &mut held.frame;
        if held.ipv6 {
            let payload_len = (frame.len() - ip - IPV6_HEADER) as u16;
            frame[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
        } else {
            let total_len = (frame.len() - ip) as u16;
            frame[ip + 2..ip + 4].copy_from_slice(&total_len.to_be_bytes());
            frame[ip + 10] = 0;
            frame[ip + 11] = 0;
            let sum = !crate::checksum::fold(crate::checksum::add(0, &frame[ip..ip + IPV4_HEADER]));
            frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
        }
        stats.merged_frames += 1;
        stats.segments_merged += u64::from(held.segments);
    }
    out.deliver(held.frame);
}

/// Delivers a frame as it is.
fn pass(frame: &[u8], out: &mut dyn Delivery) {
    let mut buffer = out.buffer(frame.len());
    buffer.clear();
    buffer.extend_from_slice(frame);
    out.deliver(buffer);
}

/// Runs `batches` of frames through a fresh coalescer, flushing after each batch as the bond
/// does, with `large_buffers` merge buffers to spend: every frame delivered, in order, and the
/// counters. The fuzz harness's way in; the coalescer itself stays private to the crate.
pub fn coalesce_batches(
    batches: &[Vec<Vec<u8>>],
    large_buffers: usize,
) -> (Vec<Vec<u8>>, CoalesceStats) {
    struct Collect {
        frames: Vec<Vec<u8>>,
        large_buffers: usize,
    }
    impl Delivery for Collect {
        fn buffer(&mut self, len: usize) -> Vec<u8> {
            Vec::with_capacity(len)
        }
        fn large_buffer(&mut self) -> Option<Vec<u8>> {
            self.large_buffers = self.large_buffers.checked_sub(1)?;
            Some(Vec::with_capacity(MAX_COALESCED_FRAME))
        }
        fn deliver(&mut self, frame: Vec<u8>) {
            self.frames.push(frame);
        }
        fn recycle(&mut self, _buffer: Vec<u8>) {}
    }
    let mut coalescer = Coalescer::new();
    let mut out = Collect {
        frames: Vec::new(),
        large_buffers,
    };
    for batch in batches {
        for frame in batch {
            coalescer.offer(frame, &mut out);
        }
        coalescer.flush(&mut out);
    }
    (out.frames, coalescer.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Collects what the coalescer delivers.
    struct Out {
        frames: Vec<Vec<u8>>,
        /// 64 KiB buffers the "heap" still has.
        memory_left: usize,
    }

    impl Default for Out {
        fn default() -> Out {
            Out {
                frames: Vec::new(),
                memory_left: usize::MAX,
            }
        }
    }

    impl Delivery for Out {
        fn buffer(&mut self, len: usize) -> Vec<u8> {
            Vec::with_capacity(len)
        }

        fn large_buffer(&mut self) -> Option<Vec<u8>> {
            self.memory_left.checked_sub(1).map(|left| {
                self.memory_left = left;
                Vec::with_capacity(MAX_COALESCED_FRAME)
            })
        }

        fn recycle(&mut self, _buffer: Vec<u8>) {}

        fn deliver(&mut self, frame: Vec<u8>) {
            self.frames.push(frame);
        }
    }

    /// A TCP segment to build.
    #[derive(Clone)]
    struct Spec {
        ipv6: bool,
        source_mac: u8,
        source_port: u16,
        sequence: u32,
        acknowledgement: u32,
        flags: u8,
        window: u16,
        tos: u8,
        ttl: u8,
        options: Vec<u8>,
        payload_len: usize,
    }

    const ISN: u32 = 0xffff_f000; // close to wrapping, on purpose
    const MSS: usize = 1448;

    fn spec() -> Spec {
        Spec {
            ipv6: false,
            source_mac: 9,
            source_port: 40000,
            sequence: ISN,
            acknowledgement: 7777,
            flags: ACK,
            window: 500,
            tos: 0,
            ttl: 64,
            options: timestamp_option(100, 50),
            payload_len: MSS,
        }
    }

    fn timestamp_option(tsval: u32, tsecr: u32) -> Vec<u8> {
        let mut option = vec![OPTION_NOP, OPTION_NOP, OPTION_TIMESTAMP, 10];
        option.extend_from_slice(&tsval.to_be_bytes());
        option.extend_from_slice(&tsecr.to_be_bytes());
        option
    }

    /// The payload byte at sequence number `sequence`: any two segments agree on the bytes
    /// they share, so a merged frame can be checked against the sequence space.
    fn byte_at(sequence: u32) -> u8 {
        (sequence.wrapping_mul(2_654_435_761) >> 24) as u8
    }

    fn build(spec: &Spec) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, spec.source_mac];
        let tcp_len = TCP_HEADER + spec.options.len();
        assert_eq!(spec.options.len() % 4, 0);
        if spec.ipv6 {
            frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            frame.extend_from_slice(&[0x60 | (spec.tos >> 4), spec.tos << 4, 0, 0]);
            frame.extend_from_slice(&((tcp_len + spec.payload_len) as u16).to_be_bytes());
            frame.extend_from_slice(&[PROTOCOL_TCP, spec.ttl]);
            frame.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            frame.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        } else {
            frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let total = (IPV4_HEADER + tcp_len + spec.payload_len) as u16;
            frame.extend_from_slice(&[0x45, spec.tos]);
            frame.extend_from_slice(&total.to_be_bytes());
            frame.extend_from_slice(&[0x12, 0x34, 0x40, 0, spec.ttl, PROTOCOL_TCP, 0, 0]);
            frame.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        }
        frame.extend_from_slice(&spec.source_port.to_be_bytes());
        frame.extend_from_slice(&5201u16.to_be_bytes());
        frame.extend_from_slice(&spec.sequence.to_be_bytes());
        frame.extend_from_slice(&spec.acknowledgement.to_be_bytes());
        frame.push(((tcp_len / 4) as u8) << 4);
        frame.push(spec.flags);
        frame.extend_from_slice(&spec.window.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(&spec.options);
        let payload_start = spec.sequence.wrapping_add(u32::from(spec.flags & SYN != 0));
        frame.extend((0..spec.payload_len as u32).map(|i| byte_at(payload_start.wrapping_add(i))));
        crate::checksum::fill(&mut frame);
        assert!(crate::checksum::verify(&frame));
        frame
    }

    /// Segment `index` of a flow of full-sized segments starting at [`ISN`].
    fn nth(base: &Spec, index: u32) -> Spec {
        Spec {
            sequence: base.sequence.wrapping_add(index * MSS as u32),
            ..base.clone()
        }
    }

    fn offer_all(coalescer: &mut Coalescer, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Out::default();
        for frame in frames {
            coalescer.offer(frame, &mut out);
        }
        coalescer.flush(&mut out);
        out.frames
    }

    /// (sequence, payload length, flags) of a delivered frame, after checking that it is a
    /// well-formed TCP frame whose payload matches the sequence space.
    fn describe(frame: &[u8]) -> (u32, usize, u8) {
        let Parsed::Tcp(segment) = parse(frame) else {
            panic!("not a TCP frame");
        };
        assert_eq!(segment.end, frame.len(), "no bytes beyond the IP packet");
        if !segment.ipv6 {
            assert_eq!(
                crate::checksum::fold(crate::checksum::add(0, &frame[14..34])),
                0xffff,
                "IPv4 header checksum"
            );
        }
        for (offset, byte) in frame[segment.payload..].iter().enumerate() {
            assert_eq!(*byte, byte_at(segment.sequence.wrapping_add(offset as u32)));
        }
        (segment.sequence, segment.payload_len(), segment.flags)
    }

    fn described(frames: &[Vec<u8>]) -> Vec<(u32, usize, u8)> {
        frames.iter().map(|frame| describe(frame)).collect()
    }

    fn seq(index: u32) -> u32 {
        ISN.wrapping_add(index * MSS as u32)
    }

    #[test]
    fn consecutive_segments_of_a_flow_become_one_frame() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        let mut frames: Vec<Vec<u8>> = (0..5).map(|index| build(&nth(&base, index))).collect();
        // The last carries the newest window.
        frames[4] = build(&Spec {
            window: 900,
            ..nth(&base, 4)
        });
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(
            described(&out),
            [(ISN, 5 * MSS, ACK)],
            "one frame across the wrap"
        );
        assert_eq!(
            u16::from_be_bytes([out[0][14 + 20 + 14], out[0][14 + 20 + 15]]),
            900
        );
        assert_eq!(coalescer.stats.merged_frames, 1);
        assert_eq!(coalescer.stats.segments_merged, 5);
        assert_eq!(
            coalescer.fast_appends, 4,
            "every segment after the first, cheaply"
        );
        // Flushed: the next batch starts afresh and a lone segment goes out unchanged.
        let next = build(&nth(&base, 5));
        assert_eq!(
            offer_all(&mut coalescer, core::slice::from_ref(&next)),
            [next]
        );
    }

    #[test]
    fn psh_ends_the_merge_and_a_lone_psh_segment_is_not_held() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        let push = |index| {
            build(&Spec {
                flags: ACK | PSH,
                ..nth(&base, index)
            })
        };
        let frames = [
            build(&nth(&base, 0)),
            push(1),
            build(&nth(&base, 2)),
            push(3),
        ];
        let mut out = Out::default();
        for frame in &frames[..2] {
            coalescer.offer(frame, &mut out);
        }
        assert_eq!(
            described(&out.frames),
            [(seq(0), 2 * MSS, ACK | PSH)],
            "delivered at the PSH, before the batch ends"
        );
        coalescer.offer(&frames[2], &mut out);
        coalescer.offer(&frames[3], &mut out);
        coalescer.offer(&push(4), &mut out);
        assert_eq!(out.frames.len(), 3, "the lone PSH segment went out at once");
        assert_eq!(
            described(&out.frames[1..]),
            [(seq(2), 2 * MSS, ACK | PSH), (seq(4), MSS, ACK | PSH)]
        );
    }

    #[test]
    fn special_flags_are_never_merged_and_flush_their_flow_first() {
        for flag in [FIN, SYN, RST, URG, ECE, CWR] {
            let mut coalescer = Coalescer::new();
            let base = spec();
            let special = build(&Spec {
                flags: ACK | flag,
                ..nth(&base, 2)
            });
            let frames = [
                build(&nth(&base, 0)),
                build(&nth(&base, 1)),
                special.clone(),
            ];
            let out = offer_all(&mut coalescer, &frames);
            assert_eq!(out.len(), 2, "flag {flag:#x}");
            assert_eq!(describe(&out[0]), (seq(0), 2 * MSS, ACK), "flag {flag:#x}");
            assert_eq!(
                out[1], special,
                "flag {flag:#x}: passed unchanged, after the flow"
            );
            assert_eq!(coalescer.stats.refused_flags, 1, "flag {flag:#x}");
        }
    }

    #[test]
    fn pure_acks_pass_after_the_held_data_of_their_flow() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        let ack = build(&Spec {
            payload_len: 0,
            ..nth(&base, 2)
        });
        let out = offer_all(
            &mut coalescer,
            &[build(&nth(&base, 0)), build(&nth(&base, 1)), ack.clone()],
        );
        assert_eq!(out[1], ack);
        assert_eq!(describe(&out[0]), (seq(0), 2 * MSS, ACK));
        assert_eq!(coalescer.stats.refused_no_payload, 1);
    }

    #[test]
    fn interleaved_flows_merge_separately_in_order() {
        let mut coalescer = Coalescer::new();
        let a = spec();
        let b = Spec {
            source_port: 40001,
            ..spec()
        };
        let c = Spec {
            source_mac: 10,
            ..spec()
        };
        let frames: Vec<Vec<u8>> = (0..4)
            .flat_map(|index| {
                [
                    build(&nth(&a, index)),
                    build(&nth(&b, index)),
                    build(&nth(&c, index)),
                ]
            })
            .collect();
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(
            out.len(),
            3,
            "one frame per flow (ports and MACs tell flows apart)"
        );
        for frame in &out {
            assert_eq!(describe(frame), (ISN, 4 * MSS, ACK));
        }
        assert_eq!(coalescer.stats.segments_merged, 12);
    }

    #[test]
    fn a_hole_stops_merging_until_it_is_filled() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        // Segment 2 is lost; 3, 4 and 5 arrive; then 2 is retransmitted; then 6, 7.
        let batch = [0, 1, 3, 4, 5].map(|index| build(&nth(&base, index)));
        let out = offer_all(&mut coalescer, &batch);
        assert_eq!(
            described(&out),
            [
                (seq(0), 2 * MSS, ACK),
                (seq(3), MSS, ACK),
                (seq(4), MSS, ACK),
                (seq(5), MSS, ACK),
            ],
            "one segment per frame behind the hole: one duplicate ACK each"
        );
        // The next batch: still behind the hole.
        let out = offer_all(
            &mut coalescer,
            &[6, 7].map(|index| build(&nth(&base, index))),
        );
        assert_eq!(described(&out), [(seq(6), MSS, ACK), (seq(7), MSS, ACK)]);
        // The retransmission fills it; from then on segments merge again.
        let out = offer_all(
            &mut coalescer,
            &[2, 8, 9].map(|index| build(&nth(&base, index))),
        );
        assert_eq!(
            described(&out),
            [(seq(2), MSS, ACK), (seq(8), 2 * MSS, ACK)]
        );
        assert_eq!(coalescer.stats.refused_out_of_order, 6);
    }

    #[test]
    fn reordered_and_repeated_segments_keep_their_order() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        // 0 1 | 3 (early) | 2 (late: fills) | 2 again (a repeat) | 4 5
        let order = [0, 1, 3, 2, 2, 4, 5];
        let frames = order.map(|index| build(&nth(&base, index)));
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(
            described(&out),
            [
                (seq(0), 2 * MSS, ACK),
                (seq(3), MSS, ACK),
                (seq(2), MSS, ACK),
                (seq(2), MSS, ACK),
                (seq(4), 2 * MSS, ACK),
            ]
        );
    }

    /// A name, a change to a segment, the counter that must count the refusal.
    type HeaderCase = (&'static str, fn(Spec) -> Spec, fn(&CoalesceStats) -> u64);
    /// A change that makes a frame's lengths or fields lie.
    type Lie = fn(&mut Vec<u8>);

    #[test]
    fn header_differences_refuse_the_merge() {
        let cases: [HeaderCase; 7] = [
            (
                "tos/ecn",
                |s| Spec { tos: 3, ..s },
                |c| c.refused_header_mismatch,
            ),
            (
                "ttl",
                |s| Spec { ttl: 63, ..s },
                |c| c.refused_header_mismatch,
            ),
            (
                "ack",
                |s| Spec {
                    acknowledgement: 8000,
                    ..s
                },
                |c| c.refused_header_mismatch,
            ),
            (
                "options",
                |s| Spec {
                    options: vec![OPTION_NOP, OPTION_NOP, 4, 2],
                    ..s
                },
                |c| c.refused_tcp_options,
            ),
            (
                "tsval backwards",
                |s| Spec {
                    options: timestamp_option(99, 50),
                    ..s
                },
                |c| c.refused_tcp_options,
            ),
            (
                "tsecr backwards",
                |s| Spec {
                    options: timestamp_option(100, 49),
                    ..s
                },
                |c| c.refused_tcp_options,
            ),
            (
                "no timestamps",
                |s| Spec {
                    options: vec![],
                    ..s
                },
                |c| c.refused_tcp_options,
            ),
        ];
        for (name, change, counter) in cases {
            let mut coalescer = Coalescer::new();
            let base = spec();
            let frames = [
                build(&nth(&base, 0)),
                build(&nth(&base, 1)),
                build(&change(nth(&base, 2))),
                build(&change(nth(&base, 3))),
            ];
            let out = offer_all(&mut coalescer, &frames);
            assert_eq!(
                described(&out)
                    .iter()
                    .map(|d| (d.0, d.1))
                    .collect::<Vec<_>>(),
                [(seq(0), 2 * MSS), (seq(2), 2 * MSS)],
                "{name}: the changed segments start a frame of their own"
            );
            assert_eq!(counter(&coalescer.stats), 1, "{name}");
        }
    }

    #[test]
    fn timestamps_moving_forward_merge_and_the_first_are_kept() {
        let mut coalescer = Coalescer::new();
        let frames: Vec<Vec<u8>> = (0..3)
            .map(|index| {
                build(&Spec {
                    options: timestamp_option(100 + index, 50 + index),
                    ..nth(&spec(), index)
                })
            })
            .collect();
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(describe(&out[0]), (ISN, 3 * MSS, ACK));
        assert_eq!(
            out[0][14 + 20 + 20..14 + 20 + 32],
            timestamp_option(100, 50)[..]
        );
    }

    #[test]
    fn ip_options_fragments_and_extension_headers_are_not_merged() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        let with_options = |index| {
            let mut frame = build(&nth(&base, index));
            // IHL 6: a 4-byte option (NOP NOP NOP EOL) between IP and TCP headers.
            frame[14] = 0x46;
            frame.splice(34..34, [1, 1, 1, 0]);
            let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
            frame[16..18].copy_from_slice(&total.to_be_bytes());
            crate::checksum::fill(&mut frame);
            frame
        };
        let frames = [
            build(&nth(&base, 0)),
            with_options(1),
            with_options(2),
            build(&nth(&base, 3)),
        ];
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(out.len(), 4, "nothing merged around the IPv4 options");
        assert_eq!(&out[1..3], &frames[1..3]);
        assert_eq!(coalescer.stats.refused_ip_options, 2);

        // A fragment (more-fragments set): every held frame goes first.
        let mut coalescer = Coalescer::new();
        let mut fragment = build(&nth(&base, 2));
        fragment[20] |= 0x20;
        let frames = [
            build(&nth(&base, 0)),
            build(&nth(&base, 1)),
            fragment.clone(),
        ];
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], fragment);

        // IPv6 with a hop-by-hop header in front of TCP: likewise.
        let mut coalescer = Coalescer::new();
        let v6 = Spec {
            ipv6: true,
            ..spec()
        };
        let mut extension = build(&nth(&v6, 2));
        extension[14 + 6] = 0;
        let frames = [build(&nth(&v6, 0)), build(&nth(&v6, 1)), extension.clone()];
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(describe(&out[0]), (seq(0), 2 * MSS, ACK));
        assert_eq!(out[1], extension);
    }

    #[test]
    fn ipv6_segments_merge() {
        let mut coalescer = Coalescer::new();
        let v6 = Spec {
            ipv6: true,
            tos: 0x20,
            ..spec()
        };
        let frames: Vec<Vec<u8>> = (0..6).map(|index| build(&nth(&v6, index))).collect();
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(described(&out), [(ISN, 6 * MSS, ACK)]);
        let payload_len = u16::from_be_bytes([out[0][18], out[0][19]]);
        assert_eq!(usize::from(payload_len), out[0].len() - 14 - 40);
        // A different traffic class (ECN CE) is not merged into it.
        let mut coalescer = Coalescer::new();
        let marked = build(&Spec {
            tos: 0x23,
            ..nth(&v6, 1)
        });
        let out = offer_all(&mut coalescer, &[build(&nth(&v6, 0)), marked]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn frames_stop_at_the_64_kib_limit_of_an_ip_packet() {
        let mut coalescer = Coalescer::new();
        let frames: Vec<Vec<u8>> = (0..100).map(|index| build(&nth(&spec(), index))).collect();
        let out = offer_all(&mut coalescer, &frames);
        // 40 bytes IPv4+TCP and 12 of options: 45 segments of 1448 bytes fit in 65 535.
        let per_frame = (MAX_IP_LENGTH - 52) / MSS;
        assert_eq!(per_frame, 45);
        let lengths: Vec<usize> = described(&out).iter().map(|d| d.1).collect();
        assert_eq!(lengths, [per_frame * MSS, per_frame * MSS, 10 * MSS]);
        assert!(out.iter().all(|frame| frame.len() - 14 <= MAX_IP_LENGTH));
        assert_eq!(coalescer.stats.refused_size, 2);
        // IPv6: the payload length field (not counting its 40-byte header) is the limit.
        let mut coalescer = Coalescer::new();
        let v6 = Spec {
            ipv6: true,
            ..spec()
        };
        let frames: Vec<Vec<u8>> = (0..50).map(|index| build(&nth(&v6, index))).collect();
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(described(&out)[0].1, ((MAX_IP_LENGTH - 32) / MSS) * MSS);
        assert!(out.iter().all(|frame| frame.len() <= MAX_COALESCED_FRAME));
    }

    #[test]
    fn tagged_and_other_frames_pass_untouched_without_flushing() {
        let mut coalescer = Coalescer::new();
        let base = spec();
        let mut tagged = build(&nth(&base, 1));
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        let mut arp = vec![0xff; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.resize(60, 0);
        let mut udp = build(&nth(&base, 1));
        udp[23] = PROTOCOL_UDP;
        let frames = [
            build(&nth(&base, 0)),
            tagged.clone(),
            arp.clone(),
            udp.clone(),
            build(&nth(&base, 1)),
        ];
        let out = offer_all(&mut coalescer, &frames);
        assert_eq!(out[..3], [tagged, arp, udp]);
        assert_eq!(describe(&out[3]), (ISN, 2 * MSS, ACK));
        assert_eq!(coalescer.stats.vlan_passed, 1);
    }

    #[test]
    fn frames_whose_lengths_or_fields_lie_are_never_merged_and_never_panic() {
        let base = spec();
        let good = build(&nth(&base, 1));
        let lies: [(&str, Lie); 9] = [
            ("total length beyond the frame", |f| {
                f[16..18].copy_from_slice(&3000u16.to_be_bytes())
            }),
            ("total length below the headers", |f| {
                f[16..18].copy_from_slice(&30u16.to_be_bytes())
            }),
            ("IHL below 5", |f| f[14] = 0x44),
            ("IHL beyond the packet", |f| f[14] = 0x4f),
            ("IP version 6 in an IPv4 ethertype", |f| f[14] = 0x65),
            ("TCP data offset below 5", |f| f[46] = 0x40),
            ("TCP data offset beyond the packet", |f| {
                f.truncate(14 + 20 + 40);
                f[16..18].copy_from_slice(&40u16.to_be_bytes());
                f[46] = 0xf0;
            }),
            ("an option running past the header", |f| f[57] = 40),
            ("a timestamp option of the wrong length", |f| f[57] = 6),
        ];
        for (name, lie) in lies {
            let mut coalescer = Coalescer::new();
            let mut liar = good.clone();
            lie(&mut liar);
            let out = offer_all(&mut coalescer, &[build(&nth(&base, 0)), liar.clone()]);
            assert_eq!(out.len(), 2, "{name}");
            assert_eq!(out[1], liar, "{name}: passed as it came");
            assert_eq!(coalescer.stats.merged_frames, 0, "{name}");
            assert_eq!(coalescer.stats.refused_malformed, 1, "{name}");
        }
        // Every truncation of a valid frame, and every byte of its headers set to each
        // extreme: no panic, and a merge only with a frame that still parses as the next segment.
        let mut coalescer = Coalescer::new();
        let mut out = Out::default();
        for len in 0..=good.len() {
            coalescer.offer(&build(&nth(&base, 0)), &mut out);
            coalescer.offer(&good[..len], &mut out);
            coalescer.flush(&mut out);
        }
        for position in 0..80 {
            for value in [0x00, 0x0f, 0x80, 0xff] {
                let mut mutated = good.clone();
                mutated[position] = value;
                coalescer.offer(&build(&nth(&base, 0)), &mut out);
                coalescer.offer(&mutated, &mut out);
                coalescer.flush(&mut out);
            }
        }
        for frame in &out.frames {
            if let Parsed::Tcp(segment) = parse(frame) {
                assert!(segment.end <= frame.len());
            }
        }
    }

    #[test]
    fn many_flows_evict_the_least_recently_used_held_frame() {
        let mut coalescer = Coalescer::new();
        let flows: Vec<Spec> = (0..MAX_FLOWS as u16 + 1)
            .map(|port| Spec {
                source_port: 1000 + port,
                ..spec()
            })
            .collect();
        let mut frames = Vec::new();
        for flow in &flows {
            frames.push(build(&nth(flow, 0)));
        }
        for flow in &flows {
            frames.push(build(&nth(flow, 1)));
        }
        let out = offer_all(&mut coalescer, &frames);
        // Every segment arrives exactly once and in order within its flow.
        assert_eq!(
            out.iter().map(|frame| describe(frame).1).sum::<usize>(),
            frames.len() * MSS
        );
        assert!(coalescer.stats.flow_evictions >= 1);
    }

    #[test]
    fn without_memory_for_a_large_frame_segments_pass_unmerged() {
        let mut coalescer = Coalescer::new();
        let mut out = Out {
            memory_left: 1,
            ..Out::default()
        };
        let base = spec();
        let other = Spec {
            source_port: 9,
            ..spec()
        };
        for index in 0..3 {
            coalescer.offer(&build(&nth(&base, index)), &mut out);
            coalescer.offer(&build(&nth(&other, index)), &mut out);
        }
        coalescer.flush(&mut out);
        let mut lengths: Vec<usize> = described(&out.frames).iter().map(|d| d.1).collect();
        lengths.sort();
        assert_eq!(
            lengths,
            [MSS, MSS, MSS, 3 * MSS],
            "one flow merged, the other could not"
        );
        assert_eq!(coalescer.stats.refused_memory, 2);
    }

    #[test]
    fn a_hosts_coalesced_frame_is_not_held_but_still_appended_to() {
        let mut coalescer = Coalescer::new();
        let large = Spec {
            payload_len: 30_000,
            ..spec()
        };
        let mut out = Out::default();
        let first = build(&large);
        coalescer.offer(&first, &mut out);
        assert_eq!(out.frames, [first], "passed at once, not held");
        // A held MTU-sized segment takes a following large one (within 64 KiB).
        let small = Spec {
            sequence: ISN.wrapping_add(30_000),
            ..spec()
        };
        let next = Spec {
            sequence: ISN.wrapping_add(30_000 + MSS as u32),
            ..large.clone()
        };
        coalescer.offer(&build(&small), &mut out);
        coalescer.offer(&build(&next), &mut out);
        coalescer.flush(&mut out);
        assert_eq!(
            describe(&out.frames[1]),
            (ISN.wrapping_add(30_000), MSS + 30_000, ACK)
        );
    }

    /// The fast path must decide exactly as the full rules do: random traffic (several flows,
    /// in order, reordered, repeated, with changed fields, flags, timestamps and lengths, cut
    /// short or corrupted) through a coalescer with it and one without gives the same frames
    /// in the same order and the same counters.
    #[test]
    fn the_fast_path_decides_exactly_as_the_full_rules() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |below: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(below)) as u32
        };
        let mut with_fast = Coalescer::new();
        let mut without = Coalescer::new();
        without.fast_path = false;
        let (mut out_fast, mut out_slow) = (Out::default(), Out::default());
        let flows = [
            spec(),
            Spec {
                source_port: 1,
                ..spec()
            },
            Spec {
                ipv6: true,
                ..spec()
            },
            Spec {
                options: vec![],
                ..spec()
            },
        ];
        let mut next = [0u32; 4];
        for _ in 0..20_000 {
            let flow = random(4) as usize;
            let mut segment = nth(&flows[flow], next[flow]);
            next[flow] += 1;
            match random(40) {
                0 => segment.sequence = segment.sequence.wrapping_sub(MSS as u32), // repeat
                1 => segment.sequence = segment.sequence.wrapping_add(MSS as u32), // hole
                2 => segment.flags |= PSH,
                3 => segment.flags |= [FIN, SYN, RST, URG, ECE, CWR][random(6) as usize],
                4 => segment.tos = 1,
                5 => segment.ttl = 1,
                6 => segment.acknowledgement += 1,
                7 => segment.window = random(65_536) as u16,
                8 if !segment.options.is_empty() => {
                    let tsval = 100 + random(3);
                    segment.options = timestamp_option(tsval.wrapping_sub(1), 50 + random(2));
                }
                9 => segment.payload_len = random(MSS as u32 + 1) as usize,
                10 => segment.payload_len = 20_000,
                _ => {}
            }
            let mut frame = build(&segment);
            match random(30) {
                0 => frame.truncate(random(frame.len() as u32) as usize),
                1 => {
                    let at = random(90) as usize;
                    frame[at] ^= 1 << random(8);
                }
                2 => frame.extend_from_slice(&[0; 7]), // Ethernet padding
                _ => {}
            }
            with_fast.offer(&frame, &mut out_fast);
            without.offer(&frame, &mut out_slow);
            if random(50) == 0 {
                with_fast.flush(&mut out_fast);
                without.flush(&mut out_slow);
            }
        }
        with_fast.flush(&mut out_fast);
        without.flush(&mut out_slow);
        assert_eq!(out_fast.frames.len(), out_slow.frames.len());
        assert!(
            out_fast.frames == out_slow.frames,
            "the same frames in the same order"
        );
        assert_eq!(with_fast.stats, without.stats);
        assert!(with_fast.stats.merged_frames > 100, "{:?}", with_fast.stats);
        assert!(
            with_fast.fast_appends > with_fast.stats.segments_merged / 4,
            "the fast path took part: {} of {} merged segments",
            with_fast.fast_appends,
            with_fast.stats.segments_merged
        );
    }
}
