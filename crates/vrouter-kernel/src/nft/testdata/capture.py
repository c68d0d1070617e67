"""Turns the output of `nft --debug=mnl -f FILE` into the messages of its batch, one
a line: the netlink message type (decimal) and the bytes after struct nlmsghdr (hex).
netdev.mnl was made as root with nftables 1.0.6:

    unshare -n sh -c 'ip link add d1 type veth peer name d2 &&
        nft --debug=mnl -f netdev.nft' > out.txt 2>&1
    python3 capture.py out.txt > netdev.mnl

(in the fresh namespace d2 is device 2 and d1 device 3, as the test expects).
"""
import re,sys
# Parse `nft --debug=mnl` output into messages: (type, bytes after nlmsghdr).
def parse(text):
    text=re.sub(r'\x1b\[[0-9;]*m','',text)
    msgs=[];cur=None;state=None
    for line in text.splitlines():
        m=re.match(r'\|\s+(\d{10})\s+\|\t\| message length',line)
        if m: cur={'len':int(m.group(1)),'b':bytearray()};msgs.append(cur);continue
        m=re.match(r'\|\s+(\d{5}) \| (\S+) \|\t\|  type',line)
        if m and cur is not None: cur['type']=int(m.group(1));continue
        m=re.match(r'\|(\d{5})\|(..)\|(\d{5})\|\t\|len',line)
        if m and cur is not None:
            l=int(m.group(1));f=m.group(2);t=int(m.group(3))
            if 'N' in f: t|=0x8000
            if 'B' in f: t|=0x4000
            cur['b']+=l.to_bytes(2,'little')+t.to_bytes(2,'little');continue
        m=re.match(r'\| ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2}) ([0-9a-f]{2})  \|\t\|\s+(data|extra header)',line)
        if m and cur is not None: cur['b']+=bytes(int(x,16) for x in m.groups()[:4])
    return msgs
msgs=parse(open(sys.argv[1]).read())
# keep the batch: from the batch begin (type 16) to batch end (17)
start=max(i for i,m in enumerate(msgs) if m.get('type')==16)
out=[]
for m in msgs[start+1:]:
    if m.get('type')==17: break
    assert len(m['b'])+16==m['len'],(m['type'],len(m['b']),m['len'])
    out.append(m)
for m in out: print(m['type'], m['b'].hex())
