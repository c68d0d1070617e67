//! Numbers from include/uapi/linux/netfilter/nf_tables.h, nfnetlink.h and netfilter.h
//! (the netlink ones come from netlink-packet-core).

// nfnetlink.h
pub(super) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(super) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10; // NLMSG_MIN_TYPE
pub(super) const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(super) const NFNETLINK_V0: u8 = 0;
// enum nf_tables_msg_types
pub(super) const NFT_MSG_NEWTABLE: u16 = 0;
pub(super) const NFT_MSG_DELTABLE: u16 = 2;
pub(super) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(super) const NFT_MSG_NEWRULE: u16 = 6;
pub(super) const NFT_MSG_GETRULE: u16 = 7;
pub(super) const NFT_MSG_DELRULE: u16 = 8;
pub(super) const NFT_MSG_NEWSET: u16 = 9;
pub(super) const NFT_MSG_GETSET: u16 = 10;
pub(super) const NFT_MSG_DELSET: u16 = 11;
pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(super) const NFT_MSG_GETSETELEM: u16 = 13;
pub(super) const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NFGENMSG_LEN: usize = 4;
// netfilter.h
pub(super) const NFPROTO_UNSPEC: u8 = 0;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NF_INET_LOCAL_IN: u32 = 1;
pub(super) const NF_INET_FORWARD: u32 = 2;
pub(super) const NF_ACCEPT: u32 = 1;
// enum nft_table_attributes
pub(super) const NFTA_TABLE_NAME: u16 = 1;
// enum nft_chain_attributes
pub(super) const NFTA_CHAIN_TABLE: u16 = 1;
pub(super) const NFTA_CHAIN_NAME: u16 = 3;
pub(super) const NFTA_CHAIN_HOOK: u16 = 4;
pub(super) const NFTA_CHAIN_POLICY: u16 = 5;
pub(super) const NFTA_CHAIN_TYPE: u16 = 7;
// enum nft_hook_attributes
pub(super) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(super) const NFTA_HOOK_PRIORITY: u16 = 2;
// enum nft_rule_attributes
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_HANDLE: u16 = 3;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_RULE_USERDATA: u16 = 7;
// enum nft_set_attributes
pub(super) const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
pub(super) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(super) const NFTA_SET_KEY_LEN: u16 = 5;
pub(super) const NFTA_SET_ID: u16 = 10;
pub(super) const NFTA_SET_EXPR: u16 = 17;
pub(super) const NFTA_SET_EXPRESSIONS: u16 = 18;
// nftables' datatype numbers (userspace only; `nft list` prints keys by it)
pub(super) const TYPE_IPADDR: u32 = 7;
// enum nft_set_elem_list_attributes
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_set_elem_attributes
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_USERDATA: u16 = 6;
pub(super) const NFTA_SET_ELEM_EXPR: u16 = 7;
pub(super) const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
// enum nft_list_attributes, nft_expr_attributes
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;
// enum nft_payload_attributes, nft_payload_bases
pub(super) const NFTA_PAYLOAD_DREG: u16 = 1;
pub(super) const NFTA_PAYLOAD_BASE: u16 = 2;
pub(super) const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub(super) const NFTA_PAYLOAD_LEN: u16 = 4;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
// enum nft_bitwise_attributes
pub(super) const NFTA_BITWISE_SREG: u16 = 1;
pub(super) const NFTA_BITWISE_DREG: u16 = 2;
pub(super) const NFTA_BITWISE_LEN: u16 = 3;
pub(super) const NFTA_BITWISE_MASK: u16 = 4;
pub(super) const NFTA_BITWISE_XOR: u16 = 5;
// enum nft_lookup_attributes
pub(super) const NFTA_LOOKUP_SET: u16 = 1;
pub(super) const NFTA_LOOKUP_SREG: u16 = 2;
pub(super) const NFTA_LOOKUP_DREG: u16 = 3;
pub(super) const NFTA_LOOKUP_FLAGS: u16 = 5;
// enum nft_counter_attributes
pub(super) const NFTA_COUNTER_BYTES: u16 = 1;
pub(super) const NFTA_COUNTER_PACKETS: u16 = 2;
// enum nft_data_attributes
pub(super) const NFTA_DATA_VALUE: u16 = 1;
// enum nft_registers: NFT_REG_1 (a 16-byte register; 4 bytes are used)
pub(super) const NFT_REG_1: u32 = 1;
// libnftnl's udata.h: NFTNL_UDATA_RULE_COMMENT, NFTNL_UDATA_SET_ELEM_COMMENT
pub(super) const UDATA_COMMENT: u8 = 0;
// Offsets of the addresses in the IPv4 header.
pub(super) const IPV4_SADDR: u32 = 12;
pub(super) const IPV4_DADDR: u32 = 16;

// For whole rulesets (`ruleset.rs`).
pub(super) const NF_DROP: u32 = 0;
/// NFT_JUMP (-3) as the kernel reads it from a big-endian u32.
pub(super) const NFT_JUMP: u32 = (-3i32) as u32;
// enum nft_table_attributes
pub(super) const NFTA_TABLE_FLAGS: u16 = 2;
// enum nft_set_flags
pub(super) const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_MAP: u32 = 0x8;
pub(super) const NFT_SET_CONCAT: u32 = 0x80;
// enum nft_set_attributes (more)
pub(super) const NFTA_SET_DATA_TYPE: u16 = 6;
pub(super) const NFTA_SET_DATA_LEN: u16 = 7;
pub(super) const NFTA_SET_DESC: u16 = 9;
pub(super) const NFTA_SET_USERDATA: u16 = 13;
// enum nft_set_desc_attributes, nft_set_field_attributes
pub(super) const NFTA_SET_DESC_CONCAT: u16 = 2;
pub(super) const NFTA_SET_FIELD_LEN: u16 = 1;
// NFT_DATA_VERDICT: a map's data type for verdicts
pub(super) const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
// nftables' datatype numbers: mark, ether_addr, and how a concatenation combines them
pub(super) const TYPE_MARK: u32 = 19;
pub(super) const TYPE_ETHERADDR: u32 = 9;
pub(super) const TYPE_BITS: u32 = 6;
// enum nft_set_elem_list_attributes (more)
pub(super) const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
// enum nft_set_elem_attributes (more), nft_set_elem_flags
pub(super) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(super) const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub(super) const NFTA_SET_ELEM_KEY_END: u16 = 10;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
// enum nft_data_attributes (more), nft_verdict_attributes
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;
// enum nft_registers: the verdict register and the second 32-bit register of NFT_REG_1
pub(super) const NFT_REG_VERDICT: u32 = 0;
pub(super) const NFT_REG32_01: u32 = 9;
// enum nft_payload_bases (more)
pub(super) const NFT_PAYLOAD_LL_HEADER: u32 = 0;
pub(super) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
// enum nft_meta_attributes, nft_meta_keys
pub(super) const NFTA_META_DREG: u16 = 1;
pub(super) const NFTA_META_KEY: u16 = 2;
pub(super) const NFT_META_IIFNAME: u32 = 6;
pub(super) const NFT_META_OIFNAME: u32 = 7;
pub(super) const NFT_META_IIFTYPE: u32 = 8;
pub(super) const NFT_META_L4PROTO: u32 = 16;
// enum nft_ct_attributes, nft_ct_keys
pub(super) const NFTA_CT_DREG: u16 = 1;
pub(super) const NFTA_CT_KEY: u16 = 2;
pub(super) const NFTA_CT_DIRECTION: u16 = 3;
pub(super) const NFTA_CT_SREG: u16 = 4;
pub(super) const NFT_CT_STATE: u32 = 0;
pub(super) const NFT_CT_MARK: u32 = 3;
pub(super) const NFT_CT_PROTOCOL: u32 = 10;
pub(super) const NFT_CT_PROTO_DST: u32 = 12;
pub(super) const NFT_CT_SRC_IP: u32 = 19;
pub(super) const NFT_CT_DST_IP: u32 = 20;
// enum ip_conntrack_dir
pub(super) const IP_CT_DIR_ORIGINAL: u8 = 0;
// enum ip_conntrack_status bit of `ct state new`
pub(super) const NF_CT_STATE_NEW_BIT: u32 = 8;
// enum nft_cmp_attributes, nft_cmp_ops
pub(super) const NFTA_CMP_SREG: u16 = 1;
pub(super) const NFTA_CMP_OP: u16 = 2;
pub(super) const NFTA_CMP_DATA: u16 = 3;
pub(super) const NFT_CMP_EQ: u32 = 0;
pub(super) const NFT_CMP_NEQ: u32 = 1;
pub(super) const NFT_CMP_LTE: u32 = 3;
pub(super) const NFT_CMP_GTE: u32 = 5;
// enum nft_bitwise_attributes (more), nft_bitwise_ops
pub(super) const NFTA_BITWISE_OP: u16 = 6;
pub(super) const NFT_BITWISE_BOOL: u32 = 0;
// enum nft_lookup_attributes (more), nft_lookup_flags
pub(super) const NFTA_LOOKUP_SET_ID: u16 = 4;
pub(super) const NFT_LOOKUP_F_INV: u32 = 1;
// enum nft_immediate_attributes
pub(super) const NFTA_IMMEDIATE_DREG: u16 = 1;
pub(super) const NFTA_IMMEDIATE_DATA: u16 = 2;
// IFNAMSIZ: interface names are compared as 16 bytes, NUL-padded
pub(super) const IFNAMSIZ: usize = 16;
// ARPHRD_ETHER, what `ether saddr` checks `meta iiftype` against
pub(super) const ARPHRD_ETHER: u16 = 1;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
// TCP flags byte (offset 13 of the TCP header)
pub(super) const TCP_FLAGS_OFFSET: u32 = 13;
pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_RST: u8 = 0x04;
pub(super) const TCP_ACK: u8 = 0x10;
// libnftnl's udata.h: set userdata (what `nft list` needs to print keys and data)
pub(super) const UDATA_SET_KEYBYTEORDER: u8 = 0;
pub(super) const UDATA_SET_DATABYTEORDER: u8 = 1;
pub(super) const UDATA_SET_KEY_TYPEOF: u8 = 3;
pub(super) const UDATA_SET_DATA_INTERVAL: u8 = 6;
pub(super) const UDATA_SET_ELEM_FLAGS: u8 = 1;
pub(super) const UDATA_SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
// nftables' enum byteorder and enum expr_types (for the set userdata above)
pub(super) const BYTEORDER_INVALID: u32 = 0;
pub(super) const BYTEORDER_HOST_ENDIAN: u32 = 1;
pub(super) const BYTEORDER_BIG_ENDIAN: u32 = 2;
pub(super) const EXPR_CONCAT: u32 = 13;

// For netdev tables (`ruleset.rs`): family, hook, verdicts, expressions.
pub(super) const NFPROTO_NETDEV: u8 = 5;
pub(super) const NF_NETDEV_INGRESS: u32 = 0;
pub(super) const NFTA_HOOK_DEV: u16 = 3;
/// NFT_GOTO (-4) and NFT_RETURN (-5) as the kernel reads them from a big-endian u32.
pub(super) const NFT_GOTO: u32 = (-4i32) as u32;
pub(super) const NFT_RETURN: u32 = (-5i32) as u32;
// enum nft_meta_keys (more), the EtherType of `meta protocol ip`
pub(super) const NFT_META_LEN: u32 = 0;
pub(super) const NFT_META_PROTOCOL: u32 = 1;
pub(super) const ETH_P_IP: u16 = 0x0800;
// enum nft_cmp_ops (more)
pub(super) const NFT_CMP_GT: u32 = 4;
// enum nft_byteorder_attributes, nft_byteorder_ops
pub(super) const NFTA_BYTEORDER_SREG: u16 = 1;
pub(super) const NFTA_BYTEORDER_DREG: u16 = 2;
pub(super) const NFTA_BYTEORDER_OP: u16 = 3;
pub(super) const NFTA_BYTEORDER_LEN: u16 = 4;
pub(super) const NFTA_BYTEORDER_SIZE: u16 = 5;
pub(super) const NFT_BYTEORDER_HTON: u32 = 1;
// enum nft_exthdr_attributes, nft_exthdr_op; TCPOPT_MAXSEG (kind 2, value at + 2)
pub(super) const NFTA_EXTHDR_DREG: u16 = 1;
pub(super) const NFTA_EXTHDR_TYPE: u16 = 2;
pub(super) const NFTA_EXTHDR_OFFSET: u16 = 3;
pub(super) const NFTA_EXTHDR_LEN: u16 = 4;
pub(super) const NFTA_EXTHDR_FLAGS: u16 = 5;
pub(super) const NFTA_EXTHDR_OP: u16 = 6;
pub(super) const NFTA_EXTHDR_SREG: u16 = 7;
pub(super) const NFT_EXTHDR_OP_TCPOPT: u32 = 1;
pub(super) const TCPOPT_MAXSEG: u8 = 2;
// enum nft_payload_attributes (more)
pub(super) const NFTA_PAYLOAD_SREG: u16 = 5;
// enum nft_fwd_attributes
pub(super) const NFTA_FWD_SREG_DEV: u16 = 1;
// nftables' datatype number of iface_index (a map's data type)
pub(super) const TYPE_IFINDEX: u32 = 20;
// Offsets of the MACs in the Ethernet header.
pub(super) const ETHER_DADDR: u32 = 0;
pub(super) const ETHER_SADDR: u32 = 6;
