//! STUN message codec (RFC 8489, RFC 8656 attributes, RFC 3489 classic requests).
//!
//! Parsing borrows the datagram and records attribute offsets in a fixed array, so decoding a
//! request allocates nothing. The `stun` crate is not used here: its decoder rejects RFC 3489
//! messages (no magic cookie), it has no MESSAGE-INTEGRITY-SHA256, USERHASH or
//! PASSWORD-ALGORITHMS, and its `Message` allocates a `Vec` per attribute. The crate is used in
//! the tests as an independent encoder to cross-check this one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Attributes beyond this count make a message malformed; real requests carry about ten.
const MAX_ATTRS: usize = 32;

/// STUN and TURN methods (RFC 8489 §18.2, RFC 8656 §17, RFC 6062 §6.1).
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
    pub const CONNECT: u16 = 0x00A;
    pub const CONNECTION_BIND: u16 = 0x00B;
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 3489 §11.2, RFC 5780).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const RESPONSE_ADDRESS: u16 = 0x0002;
    pub const CHANGE_REQUEST: u16 = 0x0003;
    pub const SOURCE_ADDRESS: u16 = 0x0004;
    pub const CHANGED_ADDRESS: u16 = 0x0005;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const PADDING: u16 = 0x0026;
    pub const RESPONSE_PORT: u16 = 0x0027;
    pub const CONNECTION_ID: u16 = 0x002A;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// The code drafts of RFC 8656 gave ADDITIONAL-ADDRESS-FAMILY, which coturn's client
    /// library sent until 4.6 (Debian bookworm, Ubuntu 24.04); Wireshark calls it
    /// MS-ALTERNATE-HOST-NAME. Read like ADDITIONAL-ADDRESS-FAMILY, as coturn does.
    pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: u16 = 0x8032;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    /// The allocation's bandwidth limit in an Allocate success, in units of 128 bytes per
    /// second (about kbit/s): the value coturn sends with `max-bps` (its NEW-BANDWIDTH, the
    /// comprehension-optional form of RFC 5766 drafts' BANDWIDTH), so that a client can tell
    /// a quota from the network.
    pub const BANDWIDTH: u16 = 0x8010;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;
    pub const RESPONSE_ORIGIN: u16 = 0x802B;
    pub const OTHER_ADDRESS: u16 = 0x802C;
    pub const ORIGIN: u16 = 0x802F;

    /// Comprehension-required attributes this server understands (types below 0x8000).
    pub fn is_known_required(t: u16) -> bool {
        matches!(
            t,
            MAPPED_ADDRESS
                | RESPONSE_ADDRESS
                | SOURCE_ADDRESS
                | CHANGED_ADDRESS
                | USERNAME
                | MESSAGE_INTEGRITY
                | ERROR_CODE
                | UNKNOWN_ATTRIBUTES
                | CHANNEL_NUMBER
                | LIFETIME
                | XOR_PEER_ADDRESS
                | DATA
                | REALM
                | NONCE
                | XOR_RELAYED_ADDRESS
                | REQUESTED_ADDRESS_FAMILY
                | EVEN_PORT
                | REQUESTED_TRANSPORT
                | DONT_FRAGMENT
                | MESSAGE_INTEGRITY_SHA256
                | PASSWORD_ALGORITHM
                | USERHASH
                | XOR_MAPPED_ADDRESS
                | RESERVATION_TOKEN
                | PRIORITY
                | USE_CANDIDATE
                | CONNECTION_ID
        )
    }
}

/// Message class, encoded in bits C0 and C1 of the message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

pub fn message_type(class: Class, method: u16) -> u16 {
    (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class.bits()
}

fn split_type(t: u16) -> (Class, u16) {
    let class = match t & 0x0110 {
        0x000 => Class::Request,
        0x010 => Class::Indication,
        0x100 => Class::Success,
        _ => Class::Error,
    };
    let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
    (class, method)
}

/// The 16 bytes after the length field: magic cookie and 96-bit id, or a classic 128-bit id.
/// Responses echo them unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 16]);

impl TransactionId {
    pub fn is_classic(&self) -> bool {
        self.0[..4] != MAGIC_COOKIE.to_be_bytes()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than a STUN header")]
    TooShort,
    #[error("first two bits are not zero")]
    NotStun,
    #[error("length field does not match the datagram")]
    BadLength,
    #[error("attribute runs past the end")]
    TruncatedAttribute,
    #[error("too many attributes")]
    TooManyAttributes,
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
    #[error("bad FINGERPRINT")]
    BadFingerprint,
    #[error("MESSAGE-INTEGRITY is not 20 bytes")]
    BadIntegrity,
}

#[derive(Debug, Clone, Copy)]
struct AttrRef {
    ty: u16,
    len: u16,
    /// u32: a message framed on a stream may reach 20 + 65535 bytes.
    start: u32,
}

/// A parsed STUN message borrowing its datagram.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    raw: &'a [u8],
    class: Class,
    method: u16,
    tid: TransactionId,
    attrs: [AttrRef; MAX_ATTRS],
    n_attrs: usize,
    /// Offsets of the integrity attributes' headers, if present.
    integrity: Option<usize>,
    integrity_sha256: Option<usize>,
}

/// How many bytes a STUN message starting at `buf` occupies, from its header; for stream framing.
pub fn framed_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    Some(HEADER_LEN + u16::from_be_bytes([buf[2], buf[3]]) as usize)
}

impl<'a> Message<'a> {
    /// Parses one datagram. FINGERPRINT, where present, is verified here.
    pub fn parse(raw: &'a [u8]) -> Result<Self, ParseError> {
        if raw.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if raw[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        let len = u16::from_be_bytes([raw[2], raw[3]]) as usize;
        if len % 4 != 0 || HEADER_LEN + len != raw.len() {
            return Err(ParseError::BadLength);
        }
        let (class, method) = split_type(u16::from_be_bytes([raw[0], raw[1]]));
        let mut tid = [0u8; 16];
        tid.copy_from_slice(&raw[4..20]);
        let mut msg = Message {
            raw,
            class,
            method,
            tid: TransactionId(tid),
            attrs: [AttrRef {
                ty: 0,
                start: 0,
                len: 0,
            }; MAX_ATTRS],
            n_attrs: 0,
            integrity: None,
            integrity_sha256: None,
        };
        let mut pos = HEADER_LEN;
        let mut fingerprint = None;
        while pos < raw.len() {
            if fingerprint.is_some() {
                return Err(ParseError::AfterFingerprint);
            }
            if raw.len() - pos < 4 {
                return Err(ParseError::TruncatedAttribute);
            }
            let ty = u16::from_be_bytes([raw[pos], raw[pos + 1]]);
            let alen = u16::from_be_bytes([raw[pos + 2], raw[pos + 3]]) as usize;
            let start = pos + 4;
            let padded = (alen + 3) & !3;
            if start + padded > raw.len() {
                return Err(ParseError::TruncatedAttribute);
            }
            match ty {
                attr::FINGERPRINT => {
                    if alen != 4 {
                        return Err(ParseError::BadFingerprint);
                    }
                    fingerprint = Some(pos);
                }
                attr::MESSAGE_INTEGRITY if msg.integrity.is_none() => {
                    if alen != 20 {
                        return Err(ParseError::BadIntegrity);
                    }
                    msg.integrity = Some(pos)
                }
                attr::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    msg.integrity_sha256 = Some(pos)
                }
                _ => {}
            }
            // RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored, except
            // MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
            let after_integrity = msg.integrity.is_some_and(|p| p < pos)
                || msg.integrity_sha256.is_some_and(|p| p < pos);
            if !after_integrity || ty == attr::MESSAGE_INTEGRITY_SHA256 {
                if msg.n_attrs == MAX_ATTRS {
                    return Err(ParseError::TooManyAttributes);
                }
                msg.attrs[msg.n_attrs] = AttrRef {
                    ty,
                    len: alen as u16,
                    start: start as u32,
                };
                msg.n_attrs += 1;
            }
            pos = start + padded;
        }
        if let Some(fp) = fingerprint {
            let want = u32::from_be_bytes([raw[fp + 4], raw[fp + 5], raw[fp + 6], raw[fp + 7]]);
            if crc32fast::hash(&raw[..fp]) ^ FINGERPRINT_XOR != want {
                return Err(ParseError::BadFingerprint);
            }
        }
        Ok(msg)
    }

    pub fn class(&self) -> Class {
        self.class
    }
    pub fn method(&self) -> u16 {
        self.method
    }
    pub fn transaction_id(&self) -> TransactionId {
        self.tid
    }
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Attribute types in order of appearance (those after MESSAGE-INTEGRITY excluded).
    pub fn attribute_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.attrs[..self.n_attrs].iter().map(|a| a.ty)
    }

    /// Value of the first attribute of this type.
    pub fn get(&self, ty: u16) -> Option<&'a [u8]> {
        self.attrs[..self.n_attrs]
            .iter()
            .find(|a| a.ty == ty)
            .map(|a| &self.raw[a.start as usize..a.start as usize + a.len as usize])
    }

    /// Values of every attribute of this type.
    pub fn get_all(&self, ty: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        let raw = self.raw;
        self.attrs[..self.n_attrs]
            .iter()
            .filter(move |a| a.ty == ty)
            .map(move |a| &raw[a.start as usize..a.start as usize + a.len as usize])
    }

    pub fn has(&self, ty: u16) -> bool {
        self.get(ty).is_some()
    }

    pub fn get_u32(&self, ty: u16) -> Option<u32> {
        let v = self.get(ty)?;
        (v.len() == 4).then(|| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    /// Decodes an XOR-*-ADDRESS attribute value.
    pub fn xor_address(&self, value: &[u8]) -> Option<SocketAddr> {
        decode_address(value, Some(&self.tid))
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some() || self.integrity_sha256.is_some()
    }

    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Verifies MESSAGE-INTEGRITY (HMAC-SHA1) with the long-term key.
    pub fn check_integrity_sha1(&self, key: &[u8]) -> bool {
        let Some(pos) = self.integrity else {
            return false;
        };
        let Some(want) = self.raw.get(pos + 4..pos + 24) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
            return false;
        };
        self.feed_integrity(&mut mac, pos, 24);
        mac.verify_slice(want).is_ok()
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6); the value may be truncated to 16+ bytes.
    pub fn check_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(pos) = self.integrity_sha256 else {
            return false;
        };
        let alen = u16::from_be_bytes([self.raw[pos + 2], self.raw[pos + 3]]) as usize;
        if !(16..=32).contains(&alen) || alen % 4 != 0 {
            return false;
        }
        let want = &self.raw[pos + 4..pos + 4 + alen];
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        self.feed_integrity(&mut mac, pos, 4 + alen);
        mac.verify_truncated_left(want).is_ok()
    }

    /// Feeds the message up to the attribute at `pos`, with the header length rewritten as if
    /// the message ended after that attribute (RFC 8489 §14.5).
    fn feed_integrity<M: Mac>(&self, mac: &mut M, pos: usize, attr_len: usize) {
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.raw[..HEADER_LEN]);
        let len = (pos - HEADER_LEN + attr_len) as u16;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        mac.update(&header);
        mac.update(&self.raw[HEADER_LEN..pos]);
    }
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `tid` given means XOR-encoded.
pub fn decode_address(v: &[u8], tid: Option<&TransactionId>) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let family = v[1];
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (family, v.len()) {
        (0x01, 8) => {
            let mut ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]);
            if tid.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&v[4..20]);
            if let Some(tid) = tid {
                for (b, k) in ip.iter_mut().zip(tid.0.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

/// Writes a STUN message into a caller-owned buffer, so steady-state responses allocate nothing.
pub struct Builder<'b> {
    buf: &'b mut Vec<u8>,
    tid: TransactionId,
}

impl<'b> Builder<'b> {
    pub fn new(buf: &'b mut Vec<u8>, class: Class, method: u16, tid: TransactionId) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(class, method).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&tid.0);
        Builder { buf, tid }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn attr(&mut self, ty: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&ty.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_len();
        self
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_be_bytes())
    }

    pub fn address(&mut self, ty: u16, addr: SocketAddr) -> &mut Self {
        let v = encode_address(addr, None);
        self.attr(ty, &v[..address_len(addr)])
    }

    pub fn xor_address(&mut self, ty: u16, addr: SocketAddr) -> &mut Self {
        let v = encode_address(addr, Some(&self.tid));
        self.attr(ty, &v[..address_len(addr)])
    }

    pub fn error(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = [0u8; 4 + 128];
        v[2] = (code / 100) as u8;
        v[3] = (code % 100) as u8;
        let r = &reason.as_bytes()[..reason.len().min(128)];
        v[4..4 + r.len()].copy_from_slice(r);
        self.attr(attr::ERROR_CODE, &v[..4 + r.len()])
    }

    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let mut v = [0u8; 2 * MAX_ATTRS];
        for (i, t) in types.iter().take(MAX_ATTRS).enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.attr(
            attr::UNKNOWN_ATTRIBUTES,
            &v[..2 * types.len().min(MAX_ATTRS)],
        )
    }

    pub fn integrity_sha1(&mut self, key: &[u8]) -> &mut Self {
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
            return self;
        };
        let len = (self.buf.len() - HEADER_LEN + 24) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        mac.update(self.buf);
        let tag = mac.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &tag)
    }

    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return self;
        };
        let len = (self.buf.len() - HEADER_LEN + 36) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        mac.update(self.buf);
        let tag = mac.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &tag)
    }

    pub fn fingerprint(&mut self) -> &mut Self {
        let len = (self.buf.len() - HEADER_LEN + 8) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(self.buf) ^ FINGERPRINT_XOR;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn address_len(addr: SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    }
}

fn encode_address(addr: SocketAddr, tid: Option<&TransactionId>) -> [u8; 20] {
    let mut v = [0u8; 20];
    let mut port = addr.port();
    if tid.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    v[2..4].copy_from_slice(&port.to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            v[1] = 0x01;
            let mut bits = u32::from(ip);
            if tid.is_some() {
                bits ^= MAGIC_COOKIE;
            }
            v[4..8].copy_from_slice(&bits.to_be_bytes());
        }
        IpAddr::V6(ip) => {
            v[1] = 0x02;
            let mut bytes = ip.octets();
            if let Some(tid) = tid {
                for (b, k) in bytes.iter_mut().zip(tid.0.iter()) {
                    *b ^= k;
                }
            }
            v[4..20].copy_from_slice(&bytes);
        }
    }
    v
}

/// ChannelData (RFC 8656 §12.4): first two bits 01.
pub fn is_channel_data(buf: &[u8]) -> bool {
    !buf.is_empty() && buf[0] & 0xC0 == 0x40
}

pub const CHANNEL_MIN: u16 = 0x4000;
/// RFC 8656 narrowed channels to 0x4000-0x4FFF, but RFC 5766 clients (coturn's among them)
/// still pick numbers up to 0x7FFF, which cannot be mistaken for STUN or DTLS either.
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// Splits a ChannelData datagram into channel number and payload length; None when malformed.
/// UDP datagrams may carry up to three bytes of padding after the payload.
#[inline]
pub fn channel_data_header(buf: &[u8]) -> Option<(u16, usize)> {
    if buf.len() < 4 {
        return None;
    }
    let ch = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&ch) || len > buf.len() - 4 {
        return None;
    }
    Some((ch, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // RFC 5769 §2.1: sample request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
    const RFC5769_REQUEST: &str = "
        00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
        80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
        00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
        00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20 00 08 00 14
        9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
        80 28 00 04 e5 7a 3b cf";

    #[test]
    fn rfc5769_request_integrity_and_fingerprint() {
        let raw = hex(RFC5769_REQUEST);
        let msg = Message::parse(&raw).expect("parses");
        assert_eq!(msg.class(), Class::Request);
        assert_eq!(msg.method(), method::BINDING);
        assert_eq!(msg.get(attr::USERNAME), Some(&b"evtj:h6vY"[..]));
        assert!(msg.check_integrity_sha1(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!msg.check_integrity_sha1(b"wrong"));
    }

    #[test]
    fn rfc5769_ipv4_response() {
        let raw = hex("
            01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
            80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 08
            00 01 a1 47 e1 12 a6 43 00 08 00 14 2b 91 f5 99 fd 9e 90 c3
            8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7 80 28 00 04 c0 7d 4c 96");
        let msg = Message::parse(&raw).expect("parses");
        let v = msg.get(attr::XOR_MAPPED_ADDRESS).expect("xor-mapped");
        assert_eq!(
            msg.xor_address(v),
            Some("192.0.2.1:32853".parse().expect("addr"))
        );
        assert!(msg.check_integrity_sha1(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    #[test]
    fn rfc5769_ipv6_response() {
        let raw = hex("
            01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
            80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20 00 20 00 14
            00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
            00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75
            bf e3 ed 41 80 28 00 04 c8 fb 0b 4c");
        let msg = Message::parse(&raw).expect("parses");
        let v = msg.get(attr::XOR_MAPPED_ADDRESS).expect("xor-mapped");
        assert_eq!(
            msg.xor_address(v),
            Some(
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .expect("addr")
            )
        );
        assert!(msg.check_integrity_sha1(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }

    #[test]
    fn rfc5769_long_term_request() {
        // §2.4: username U+30DE U+30C8 U+30EA U+30C3 U+30AF U+30B9, password "TheMatrIX"
        // after SASLprep, realm "example.org"; key = MD5(username:realm:password).
        let raw = hex("
            00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
            00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3
            82 b9 00 00 00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36
            4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 14 00 0b
            65 78 61 6d 70 6c 65 2e 6f 72 67 00 00 08 00 14 f6 70 24 65
            6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66");
        let msg = Message::parse(&raw).expect("parses");
        let user = std::str::from_utf8(msg.get(attr::USERNAME).expect("user")).expect("utf8");
        let key = crate::auth::long_term_key(user, "example.org", "TheMatrIX");
        assert!(msg.check_integrity_sha1(&key));
    }

    #[test]
    fn builder_round_trips_and_signs() {
        let tid = TransactionId([
            0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ]);
        let mut buf = Vec::new();
        let addr6: SocketAddr = "[2001:db8::1]:4000".parse().expect("addr");
        Builder::new(&mut buf, Class::Success, method::ALLOCATE, tid)
            .xor_address(attr::XOR_RELAYED_ADDRESS, addr6)
            .u32(attr::LIFETIME, 600)
            .error(486, "x")
            .integrity_sha1(b"k1")
            .integrity_sha256(b"k1")
            .fingerprint();
        let msg = Message::parse(&buf).expect("parses");
        assert_eq!(msg.class(), Class::Success);
        assert_eq!(msg.method(), method::ALLOCATE);
        let v = msg.get(attr::XOR_RELAYED_ADDRESS).expect("relayed");
        assert_eq!(msg.xor_address(v), Some(addr6));
        assert_eq!(msg.get_u32(attr::LIFETIME), Some(600));
        assert!(msg.check_integrity_sha1(b"k1"));
        assert!(msg.check_integrity_sha256(b"k1"));
        assert!(!msg.check_integrity_sha256(b"k2"));
    }

    #[test]
    fn stun_crate_encoding_is_understood() {
        use stun::message::{Getter, Message as StunMessage, BINDING_REQUEST};
        let mut m = StunMessage::new();
        m.build(&[
            Box::new(stun::agent::TransactionId::new()),
            Box::new(BINDING_REQUEST),
            Box::new(stun::textattrs::TextAttribute::new(
                stun::attributes::ATTR_USERNAME,
                "alice".into(),
            )),
            Box::new(stun::integrity::MessageIntegrity::new_short_term_integrity(
                "secret".into(),
            )),
            Box::new(stun::fingerprint::FINGERPRINT),
        ])
        .expect("build");
        let msg = Message::parse(&m.raw).expect("parses");
        assert_eq!(msg.method(), method::BINDING);
        assert_eq!(msg.get(attr::USERNAME), Some(&b"alice"[..]));
        assert!(msg.check_integrity_sha1(b"secret"));
        // And the other way round: the stun crate reads what we build.
        let mut buf = Vec::new();
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        Builder::new(
            &mut buf,
            Class::Success,
            method::BINDING,
            TransactionId(tid),
        )
        .xor_address(
            attr::XOR_MAPPED_ADDRESS,
            "198.51.100.7:5000".parse().expect("a"),
        )
        .fingerprint();
        let mut back = StunMessage::new();
        back.unmarshal_binary(&buf).expect("stun crate decodes");
        let mut xor = stun::xoraddr::XorMappedAddress::default();
        xor.get_from(&back).expect("xor-mapped");
        assert_eq!(xor.port, 5000);
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let raw = hex(RFC5769_REQUEST);
        for cut in 0..raw.len() {
            let _ = Message::parse(&raw[..cut]);
        }
        let mut bad = raw.clone();
        bad[2] = 0xff;
        assert_eq!(Message::parse(&bad).err(), Some(ParseError::BadLength));
        let mut flipped = raw.clone();
        flipped[30] ^= 1;
        assert_eq!(
            Message::parse(&flipped).err(),
            Some(ParseError::BadFingerprint)
        );
        assert_eq!(Message::parse(&[0x80; 20]).err(), Some(ParseError::NotStun));
    }

    #[test]
    fn classic_transaction_ids_are_detected() {
        let mut raw = vec![0u8; 20];
        raw[1] = 1;
        raw[4..20].copy_from_slice(&[7u8; 16]);
        let msg = Message::parse(&raw).expect("classic parses");
        assert!(msg.transaction_id().is_classic());
    }

    #[test]
    fn channel_data_bounds() {
        assert_eq!(
            channel_data_header(&[0x40, 0x00, 0, 2, 9, 9]),
            Some((0x4000, 2))
        );
        assert_eq!(channel_data_header(&[0x40, 0x00, 0, 3, 9, 9]), None);
        assert_eq!(channel_data_header(&[0x7f, 0xff, 0, 0]), Some((0x7fff, 0)));
        assert_eq!(channel_data_header(&[0x80, 0x00, 0, 0]), None);
        assert_eq!(channel_data_header(&[0x40]), None);
    }
}
