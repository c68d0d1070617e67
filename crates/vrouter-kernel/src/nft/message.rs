//! The message model: an nf_tables message is `struct nfgenmsg` and a tree of
//! attributes. netlink-packet-core frames it (`struct nlmsghdr`, lengths, padding,
//! NLA_F_NESTED) and splits what the kernel sends back into messages and attributes;
//! only the nfgenmsg header and the attribute tree are ours.

use super::uapi::{NFGENMSG_LEN, NFNETLINK_V0, NFNL_SUBSYS_NFTABLES, NFPROTO_UNSPEC};
use super::uapi::{NFTA_DATA_VALUE, NFTA_EXPR_DATA, NFTA_EXPR_NAME, NFTA_LIST_ELEM};
use rtnetlink::packet_core::{
    DecodeError, Emitable, NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, Nla, NlaBuffer, NlasIterator, NLA_F_NESTED,
    NLA_HEADER_SIZE, NLM_F_REQUEST,
};

/// `struct nlmsghdr`.
pub(super) const NLMSG_HDRLEN: usize = 16;

/// One attribute: a value (already in the byte order nf_tables wants) or a nest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Attr {
    Value(u16, Vec<u8>),
    Nest(u16, Vec<Attr>),
}

impl Attr {
    /// A NUL-terminated string (NLA_STRING).
    pub(super) fn str(kind: u16, value: &str) -> Attr {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        Attr::Value(kind, v)
    }

    /// NLA_BE32: nf_tables numbers are big-endian.
    pub(super) fn be32(kind: u16, value: u32) -> Attr {
        Attr::Value(kind, value.to_be_bytes().to_vec())
    }

    pub(super) fn be64(kind: u16, value: u64) -> Attr {
        Attr::Value(kind, value.to_be_bytes().to_vec())
    }

    pub(super) fn bytes(kind: u16, value: &[u8]) -> Attr {
        Attr::Value(kind, value.to_vec())
    }

    /// `NFTA_DATA_VALUE` nested in `kind`, as keys and registers' data are passed.
    pub(super) fn data(kind: u16, value: &[u8]) -> Attr {
        Attr::Nest(kind, vec![Attr::bytes(NFTA_DATA_VALUE, value)])
    }

    /// One expression of a list: its name and its data.
    pub(super) fn expr(name: &str, data: Vec<Attr>) -> Attr {
        Attr::Nest(
            NFTA_LIST_ELEM,
            vec![
                Attr::str(NFTA_EXPR_NAME, name),
                Attr::Nest(NFTA_EXPR_DATA, data),
            ],
        )
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        match self {
            Attr::Value(_, v) => v.len(),
            Attr::Nest(_, children) => children.as_slice().buffer_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Attr::Value(kind, _) => *kind,
            // The kernel's strict parsers want the flag on nests.
            Attr::Nest(kind, _) => *kind | NLA_F_NESTED,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The length field is 16 bits: a longer attribute would wrap silently.
        assert!(
            self.value_len() + NLA_HEADER_SIZE <= usize::from(u16::MAX),
            "netlink attribute over 64 KiB"
        );
        match self {
            Attr::Value(_, v) => buffer.copy_from_slice(v),
            Attr::Nest(_, children) => children.as_slice().emit(buffer),
        }
    }
}

/// An nf_tables message: the netlink type (subsystem and message), `struct nfgenmsg`
/// (family, version, res_id) and the attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NftMessage {
    pub kind: u16,
    pub family: u8,
    pub res_id: u16,
    pub attrs: Vec<Attr>,
}

impl NftMessage {
    /// An nf_tables message `msg` (NFT_MSG_*) of `family`.
    pub(super) fn new(msg: u16, family: u8, attrs: Vec<Attr>) -> NftMessage {
        NftMessage {
            kind: nft_type(msg),
            family,
            res_id: 0,
            attrs,
        }
    }

    /// NFNL_MSG_BATCH_BEGIN/END: the subsystem goes in res_id.
    pub(super) fn batch(kind: u16) -> NftMessage {
        NftMessage {
            kind,
            family: NFPROTO_UNSPEC,
            res_id: NFNL_SUBSYS_NFTABLES,
            attrs: Vec::new(),
        }
    }
}

impl NetlinkSerializable for NftMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN + self.attrs.as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = NFNETLINK_V0;
        buffer[2..4].copy_from_slice(&self.res_id.to_be_bytes());
        self.attrs.as_slice().emit(&mut buffer[NFGENMSG_LEN..]);
    }
}

/// A request on its way: the message and its netlink flags (on top of
/// NLM_F_REQUEST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub message: NftMessage,
    pub flags: u16,
}

impl Request {
    pub(super) fn new(msg: u16, flags: u16, family: u8, attrs: Vec<Attr>) -> Request {
        Request {
            message: NftMessage::new(msg, family, attrs),
            flags,
        }
    }

    pub(super) fn batch(kind: u16) -> Request {
        Request {
            message: NftMessage::batch(kind),
            flags: 0,
        }
    }

    /// The netlink message type.
    pub(super) fn kind(&self) -> u16 {
        self.message.kind
    }

    /// The encoded length, header included.
    pub(super) fn len(&self) -> usize {
        NLMSG_HDRLEN + self.message.buffer_len()
    }

    /// The bytes to send, with sequence number `seq`.
    pub(super) fn encode(&self, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | self.flags;
        header.sequence_number = seq;
        let mut message =
            NetlinkMessage::new(header, NetlinkPayload::InnerMessage(self.message.clone()));
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }
}

/// What the kernel sends back in an nf_tables message: nfgenmsg and the attributes,
/// undecoded (see `decode.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reply {
    pub payload: Vec<u8>,
}

impl NetlinkDeserializable for Reply {
    type Error = DecodeError;

    fn deserialize(_: &NetlinkHeader, payload: &[u8]) -> Result<Reply, DecodeError> {
        Ok(Reply {
            payload: payload.to_vec(),
        })
    }
}

/// The messages of a received datagram; stops at the first malformed one.
pub(super) fn replies(buf: &[u8]) -> impl Iterator<Item = NetlinkMessage<Reply>> + '_ {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = NetlinkBuffer::new_checked(rest).ok()?.length() as usize;
        let message = NetlinkMessage::<Reply>::deserialize(&rest[..len]).ok()?;
        rest = rest.get(align4(len)..).unwrap_or_default();
        Some(message)
    })
}

/// The attributes in `buf` as (type without flags, value); stops at the first
/// malformed one.
pub(super) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(buf).map_while(|nla| {
        let nla: NlaBuffer<&[u8]> = nla.ok()?;
        let (kind, len) = (nla.kind(), usize::from(nla.length()));
        let value = &nla.into_inner()[NLA_HEADER_SIZE..len];
        Some((kind, value))
    })
}

pub(super) fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}
