/* e1000: an Intel 82540EM driver at CPL3 for pyvmm's e1000 (or QEMU's -device e1000).
 * Finds the function by PCI enumeration (8086:100E), resets it (CTRL.RST), reads the
 * EEPROM by EERD (MAC, IDs, the 0xBABA checksum) and checks the receive address the
 * reset loaded from it, reads the PHY by MDIC, brings the link up (SLU) and restarts
 * autonegotiation (a link status change), checks ICR read-to-clear, ICS/IMS/IMC and an
 * INTx interrupt through the IOAPIC, the I/O window (IOADDR/IODATA).
 * Then: 12 frames out over an 8-descriptor transmit ring (it wraps), one with IP/UDP
 * checksum offload by a context descriptor; a 16-descriptor receive ring for frames the
 * host sends (it wraps too), with a multicast group in the MTA, until a frame whose
 * payload starts with "pyvmm-end". bad=1 adds what a broken driver does (pyvmm only:
 * QEMU's answers differ, see docs/devices/e1000.md); slu=1 checks that clearing SLU
 * drops the link (pyvmm models it; QEMU ignores SLU); qemu=1 skips the I/O-window
 * check (QEMU's BAR1 reads 0).
 * peer=1: instead, wait for a frame whose payload starts with "pyvmm-tx" (a virtio-net
 * guest's on the same switch) and answer its sender with "pyvmm-end from e1000".
 * bench=N: N ping-pongs with a host echo instead (bench/nic.py).
 * One line per check ("ok ..."), frames as "rx ..." lines; FAIL exits with its code. */
#include "pci.h"

#define CTRL 0x0
#define STATUS 0x8
#define EERD 0x14
#define MDIC 0x20
#define ICR 0xC0
#define ICS 0xC8
#define IMS 0xD0
#define IMC 0xD8
#define RCTL 0x100
#define TCTL 0x400
#define RDBAL 0x2800
#define RDBAH 0x2804
#define RDLEN 0x2808
#define RDH 0x2810
#define RDT 0x2818
#define TDBAL 0x3800
#define TDBAH 0x3804
#define TDLEN 0x3808
#define TDH 0x3810
#define TDT 0x3818
#define MTA 0x5200
#define RAL0 0x5400
#define RAH0 0x5404
#define GPTC 0x4080

#define CTRL_SLU (1u << 6)
#define CTRL_ASDE (1u << 5)
#define CTRL_RST (1u << 26)
#define STATUS_LU (1u << 1)
#define ICR_TXDW 0x01
#define ICR_TXQE 0x02
#define ICR_LSC 0x04
#define ICR_RXT0 0x80
#define RCTL_EN (1u << 1)
#define RCTL_BAM (1u << 15)
#define TCTL_EN (1u << 1)
#define TCTL_PSP (1u << 3)
#define TXD_EOP (1u << 24)
#define TXD_IFCS (1u << 25)
#define TXD_RS (1u << 27)
#define TXD_DEXT (1u << 29)
#define TXD_DTYP_D (1u << 20)

#define NTX 8
#define NRX 16
#define BUFSZ 2048
#define SPIN 20000000ul

struct rxd { u64 addr; u16 len; u16 csum; u8 status; u8 err; u16 special; };
struct txd { u64 addr; u32 lower; u32 upper; };

static struct rxd rx[NRX] __attribute__((aligned(128)));
static struct txd tx[NTX] __attribute__((aligned(128)));
static u8 rxbuf[NRX][BUFSZ] __attribute__((aligned(64)));
static u8 txbuf[NTX][BUFSZ] __attribute__((aligned(64)));
static u64 bar0;
static u8 mac[6];
static u32 tail, next_rx, icr_seen;

static u32 rd(u32 r) { return mmio_read32(bar0 + r); }
static void wr(u32 r, u32 v) { mmio_write32(bar0 + r, v); }
static u32 icr(void) { u32 v = rd(ICR); icr_seen |= v; return v; }

static void check(int cond, int code, const char *what)
{
    if (!cond) {
        printf("FAIL[%d]: %s (status=%x icr_seen=%x)\n", code, what, rd(STATUS), icr_seen);
        exit((u32)code);
    }
    printf("ok %s\n", what);
}

static u16 eeprom(u32 word)
{
    wr(EERD, (word << 8) | 1);
    for (u64 i = 0; i < SPIN; i++) {
        u32 v = rd(EERD);
        if (v & 0x10)
            return (u16)(v >> 16);
    }
    fail("EERD never done");
    return 0;
}

static u32 mdic_read(u32 reg)
{
    wr(MDIC, (2u << 26) | (1u << 21) | (reg << 16));
    for (u64 i = 0; i < SPIN; i++) {
        u32 v = rd(MDIC);
        if (v & (1u << 28))
            return v;
    }
    fail("MDIC never ready");
    return 0;
}

static void mdic_write(u32 reg, u16 data)
{
    wr(MDIC, (1u << 26) | (1u << 21) | (reg << 16) | data);
    for (u64 i = 0; i < SPIN && !(rd(MDIC) & (1u << 28)); i++)
        cpu_relax();
}

/* Poll ICR (each read clears it) until one of `bits` was seen. */
static int wait_cause(u32 bits, u64 spins)
{
    icr_seen &= ~bits;
    for (u64 i = 0; i < spins; i++) {
        if (icr() & bits)
            return 1;
        cpu_relax();
    }
    return 0;
}

static int wait_status(u32 bit, int set)
{
    for (u64 i = 0; i < SPIN; i++) {
        if (!!(rd(STATUS) & bit) == set)
            return 1;
        cpu_relax();
    }
    return 0;
}

static u32 send(const u8 *frame, u32 len, u32 extra_lower, u32 upper)
{
    u32 i = tail;
    memcpy(txbuf[i], frame, len);
    tx[i] = (struct txd){ (u64)txbuf[i], len | TXD_EOP | TXD_IFCS | TXD_RS | extra_lower, upper };
    tail = (tail + 1) % NTX;
    __asm__ volatile("" ::: "memory");
    wr(TDT, tail);
    for (u64 k = 0; k < SPIN; k++)
        if (*(volatile u8 *)&tx[i].upper & 1)
            return i;
    fail("transmit descriptor %u never done (TDH=%u)", i, rd(TDH));
    return 0;
}

static u32 build(u8 *f, const u8 *dst, const char *text)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, mac, 6);
    f[12] = 0x88; f[13] = 0xb5;
    u32 n = (u32)strlen(text);
    memcpy(f + 14, text, n + 1);
    return 14 + n + 1 < 60 ? 60 : 14 + n + 1;
}

static u16 sum16(const u8 *p, u32 n, u32 seed)
{
    u32 s = seed;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += (u32)p[i] << 8 | p[i + 1];
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)s;
}

/* An IPv4/UDP frame with both checksums left to the device: a context descriptor
 * (IP header 14..33, sum at 24; UDP from 34 to the end, sum at 40), then a data
 * descriptor with IXSM|TXSM. The UDP field holds the pseudo-header sum, as a driver
 * leaves it. */
static void send_offloaded(void)
{
    static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    u8 f[128];
    memset(f, 0, sizeof f);
    memcpy(f, bcast, 6);
    memcpy(f + 6, mac, 6);
    f[12] = 0x08; f[13] = 0x00;
    const char *text = "pyvmm-csum";
    u32 plen = (u32)strlen(text), ulen = 8 + plen, ilen = 20 + ulen;
    u8 *ip = f + 14, *udp = f + 34;
    ip[0] = 0x45; ip[2] = (u8)(ilen >> 8); ip[3] = (u8)ilen; ip[8] = 64; ip[9] = 17;
    ip[12] = 10; ip[15] = 1; ip[16] = 10; ip[19] = 2;
    udp[0] = 0x04; udp[1] = 0xd2; udp[2] = 0x16; udp[3] = 0x2e;
    udp[4] = (u8)(ulen >> 8); udp[5] = (u8)ulen;
    memcpy(udp + 8, text, plen);
    u8 pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0; pseudo[9] = 17; pseudo[10] = (u8)(ulen >> 8); pseudo[11] = (u8)ulen;
    u16 ps = sum16(pseudo, 12, 0);
    udp[6] = (u8)(ps >> 8); udp[7] = (u8)ps;
    u32 i = tail;
    u8 *c = (u8 *)&tx[i];
    memset(c, 0, 16);
    c[0] = 14; c[1] = 24; c[2] = 33; c[3] = 0;   /* ipcss, ipcso, ipcse */
    c[4] = 34; c[5] = 40; c[6] = 0; c[7] = 0;    /* tucss, tucso, tucse (0: to the end) */
    tx[i].lower = TXD_DEXT | TXD_RS;             /* DTYP 0: context */
    tail = (tail + 1) % NTX;
    send(f, 34 + ulen, TXD_DEXT | TXD_DTYP_D, 3u << 8 /* POPTS IXSM|TXSM */);
    check(tx[i].upper & 1, 40, "context descriptor done");
}

static void give_back(u32 i)
{
    rx[i].status = 0;
    __asm__ volatile("" ::: "memory");
    wr(RDT, i);
}

/* The next received frame's descriptor index, or -1. Frames span one buffer here. */
static int next_frame(u64 spins)
{
    for (u64 k = 0; k < spins; k++) {
        if (*(volatile u8 *)&rx[next_rx].status & 1) {
            __asm__ volatile("" ::: "memory");
            int i = (int)next_rx;
            next_rx = (next_rx + 1) % NRX;
            return i;
        }
        cpu_relax();
    }
    return -1;
}

static u32 payload_sum(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i < n; i++)
        s = s * 31 + p[i];
    return s;
}

static void bad_driver(u32 dev)
{
    /* a transmit buffer outside RAM: the descriptor completes, nothing is sent */
    u32 i = tail;
    tx[i] = (struct txd){ 0x4000000000ul, 64 | TXD_EOP | TXD_RS, 0 };
    tail = (tail + 1) % NTX;
    wr(TDT, tail);
    check(tx[i].upper & 1 && rd(TDH) == tail, 60, "tx buffer outside RAM: descriptor completed");
    /* a tail past the ring: nothing moves, the VM goes on */
    wr(TDT, NTX + 5);
    check(rd(TDH) == tail, 61, "tx tail past the ring: head stays");
    wr(TDT, tail);
    /* a ring outside RAM */
    wr(TDBAH, 0x40);
    wr(TDT, (tail + 1) % NTX);
    check(rd(TDH) == tail, 62, "tx ring outside RAM: head stays");
    /* a zero-length ring */
    wr(TDLEN, 0);
    check(rd(TDLEN) == 0, 63, "zero-length ring accepted");
    /* reset, and the function works again */
    wr(CTRL, rd(CTRL) | CTRL_RST);
    for (u64 k = 0; k < SPIN && (rd(CTRL) & CTRL_RST); k++)
        cpu_relax();
    check(rd(TDLEN) == 0 && rd(TDBAH) == 0 && rd(IMS) == 0, 64, "CTRL.RST cleared the rings");
    (void)dev;
}

static void tx_setup(void)
{
    memset(tx, 0, sizeof tx);
    wr(TDBAL, (u32)(u64)tx);
    wr(TDBAH, (u32)((u64)tx >> 32));
    wr(TDLEN, sizeof tx);
    wr(TDH, 0);
    wr(TDT, 0);
    tail = 0;
    wr(TCTL, TCTL_EN | TCTL_PSP | (0x0f << 4) | (0x40 << 12));
}

static void rx_setup(void)
{
    for (u32 i = 0; i < NRX; i++)
        rx[i] = (struct rxd){ (u64)rxbuf[i], 0, 0, 0, 0, 0 };
    wr(RDBAL, (u32)(u64)rx);
    wr(RDBAH, (u32)((u64)rx >> 32));
    wr(RDLEN, sizeof rx);
    wr(RDH, 0);
    wr(RDT, NRX - 1);
    next_rx = 0;
    wr(RCTL, RCTL_EN | RCTL_BAM);   /* 2048-byte buffers, FCS kept, no promiscuity */
}

static void sort(u64 *v, u32 n)   /* shell sort: the bench's percentiles */
{
    for (u32 gap = n / 2; gap; gap /= 2)
        for (u32 i = gap; i < n; i++)
            for (u32 j = i; j >= gap && v[j - gap] > v[j]; j -= gap) {
                u64 t = v[j]; v[j] = v[j - gap]; v[j - gap] = t;
            }
}

/* bench=N: N ping-pongs with a host echo (dst 02:00:00:00:00:01): a 64-byte frame out,
 * the echo back, guest TSC per round trip. */
static u64 rtt[4096];

static void bench(u32 n)
{
    static const u8 echo[6] = { 0x02, 0, 0, 0, 0, 0x01 };
    if (n > 4096) n = 4096;
    u8 f[64];
    for (u32 k = 0; k < n; k++) {
        char text[32];
        snprintf(text, sizeof text, "pyvmm-ping %u", k);
        u32 len = build(f, echo, text);
        u64 t0 = rdtsc();
        send(f, len, 0, 0);
        int i = next_frame(SPIN * 50);
        if (i < 0) fail("no echo for ping %u", k);
        rtt[k] = rdtsc() - t0;
        give_back((u32)i);
    }
    sort(rtt, n);
    printf("e1000-bench rtts=%u p50_cycles=%lu p99_cycles=%lu\n", n, rtt[n / 2],
           rtt[n * 99 / 100]);
}

static void peer(void)
{
    for (;;) {
        int i = next_frame(SPIN * 50);
        if (i < 0) fail("no frame from the peer");
        u8 *f = rxbuf[i];
        if (!memcmp(f + 14, "pyvmm-tx", 8)) {
            printf("rx from peer %02x:%02x:%02x:%02x:%02x:%02x payload=%s\n", f[6], f[7],
                   f[8], f[9], f[10], f[11], (char *)f + 14);
            u8 out[64];
            u32 n = build(out, f + 6, "pyvmm-end from e1000");
            give_back((u32)i);
            send(out, n, 0, 0);
            printf("e1000: answered the peer\n");
            return;
        }
        give_back((u32)i);
    }
}

int main(void)
{
    uart_init();
    irq_init();
    lapic_enable();
    u32 dev = 32;
    for (u32 d = 0; d < 32; d++)
        if (pci_read32(0, d, 0, 0) == 0x100E8086) { dev = d; break; }
    if (dev == 32) fail("no 82540EM (8086:100E) on bus 0");
    check((pci_read32(0, dev, 0, 8) >> 8) == 0x020000, 1, "class: Ethernet controller");
    pci_write16(0, dev, 0, 4, pci_read16(0, dev, 0, 4) | 7);   /* I/O, memory, bus master */
    bar0 = pci_bar_addr(0, dev, 0, 0);
    u16 io = (u16)pci_bar_addr(0, dev, 0, 1);
    check(!(pci_read32(0, dev, 0, 0x10) & 1) && (pci_read32(0, dev, 0, 0x14) & 1), 2,
          "BAR0 memory, BAR1 I/O");

    wr(CTRL, rd(CTRL) | CTRL_RST);
    for (u64 k = 0; k < SPIN && (rd(CTRL) & CTRL_RST); k++)
        cpu_relax();
    check(!(rd(CTRL) & CTRL_RST), 3, "CTRL.RST self-clears");
    wr(IMC, 0xffffffff);
    (void)rd(ICR);

    u16 words[64];
    u32 sum = 0;
    for (u32 w = 0; w < 64; w++) {
        words[w] = eeprom(w);
        sum += words[w];
    }
    check((sum & 0xffff) == 0xBABA, 4, "EEPROM checksum 0xBABA");
    for (int k = 0; k < 3; k++) {
        mac[2 * k] = (u8)words[k];
        mac[2 * k + 1] = (u8)(words[k] >> 8);
    }
    printf("e1000 mac=%02x:%02x:%02x:%02x:%02x:%02x\n", mac[0], mac[1], mac[2], mac[3],
           mac[4], mac[5]);
    u32 ral = rd(RAL0), rah = rd(RAH0);
    check(ral == (u32)(words[0] | words[1] << 16) && (rah & 0xffff) == words[2] &&
          (rah & 0x80000000u), 5, "RAL0/RAH0 hold the EEPROM's MAC with AV");

    outl(io, STATUS);
    u32 iodata = inl(io + 4);
    printf("e1000 iodata(STATUS)=%x\n", iodata);
    if (!arg_u64("qemu", 0))   /* QEMU's I/O window is a stub that reads 0 */
        check(iodata == rd(STATUS), 6, "IOADDR/IODATA reach the registers");

    u32 id = (mdic_read(2) & 0xffff) << 16 | (mdic_read(3) & 0xffff);
    printf("e1000 phy id=%08x\n", id);
    check((id & 0xfffffff0u) == 0x01410C20, 7, "PHY ID of the 82540EM (M88E1011)");
    check(mdic_read(1) & 0x0004, 8, "PHY reports link");

    wr(CTRL, rd(CTRL) | CTRL_SLU | CTRL_ASDE);
    check(wait_status(STATUS_LU, 1), 9, "link up after SLU");
    if (arg_u64("slu", 0)) {
        (void)icr();
        wr(CTRL, rd(CTRL) & ~CTRL_SLU);
        check(wait_status(STATUS_LU, 0), 10, "clearing SLU drops the link");
        check(icr() & ICR_LSC, 11, "link down: LSC");
        icr_seen = 0;
        wr(CTRL, rd(CTRL) | CTRL_SLU);
        check(wait_status(STATUS_LU, 1) && wait_cause(ICR_LSC, 1000), 12, "link up again: LSC");
    }
    mdic_write(0, 0x1140 | 0x0200);   /* restart autonegotiation */
    check(wait_cause(ICR_LSC, 2000000), 13, "autonegotiation restart: LSC");
    check(wait_status(STATUS_LU, 1), 14, "link up after autonegotiation");

    /* interrupt causes */
    (void)rd(ICR);
    wr(ICS, ICR_TXDW | ICR_RXT0);
    check(rd(ICR) == (ICR_TXDW | ICR_RXT0), 20, "ICS sets causes, ICR shows them");
    check(rd(ICR) == 0, 21, "ICR read-to-clear");
    wr(IMS, ICR_TXDW | ICR_LSC);
    check(rd(IMS) == (ICR_TXDW | ICR_LSC), 22, "IMS reads back the mask");
    wr(IMC, ICR_LSC);
    check(rd(IMS) == ICR_TXDW, 23, "IMC clears mask bits");
    u8 gsi = pci_read8(0, dev, 0, 0x3c);
    irq_set_ack(0x42, bar0 + ICR, 0xffffffff);   /* writing ICR clears the causes */
    ioapic_route(gsi, 0x42, 0, 0);
    wr(ICS, ICR_TXDW);
    check(wait_irq(0x42, 1, SPIN), 24, "INTx for an unmasked cause");
    wr(ICS, ICR_RXT0);                           /* masked: no interrupt */
    check(!wait_irq(0x42, 2, SPIN / 20), 25, "no INTx for a masked cause");
    check(rd(ICR) == ICR_RXT0, 26, "masked cause still latched in ICR");
    wr(IMC, 0xffffffff);

    rx_setup();
    tx_setup();
    static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (arg_u64("bench", 0)) {
        bench((u32)arg_u64("bench", 0));
        return 0;
    }
    if (arg_u64("peer", 0)) {
        printf("e1000: rx ready\n");
        peer();
        return 0;
    }
    /* accept the multicast group 01:00:5e:12:34:56: MO=0 hash = bits 47:36 */
    static const u8 grp[6] = { 0x01, 0x00, 0x5e, 0x12, 0x34, 0x56 };
    u32 h = ((grp[4] >> 4) | (grp[5] << 4)) & 0xfff;
    wr(MTA + 4 * (h >> 5), 1u << (h & 31));

    u64 seed = arg_u64("seed", 0);
    (void)rd(GPTC);
    for (u32 k = 0; k < 12; k++) {   /* 12 frames over 8 descriptors: the ring wraps */
        u8 f[80];
        char text[40];
        snprintf(text, sizeof text, "pyvmm-e1000 tx %lu %u", seed, k);
        u32 n = build(f, bcast, text);
        send(f, n, 0, 0);
    }
    check(rd(TDH) == tail && tail == 12 % NTX, 30, "transmit ring wrapped, TDH == TDT");
    check(rd(GPTC) == 12, 31, "GPTC counted 12 frames");
    check(icr() & ICR_TXDW, 32, "TXDW after RS descriptors");
    send_offloaded();
    printf("e1000: tx done\n");

    u32 frames = 0;
    (void)icr();
    icr_seen = 0;
    for (;;) {
        int i = next_frame(SPIN * 50);
        if (i < 0) fail("no frame received (RDH=%u RDT=%u)", rd(RDH), rd(RDT));
        u8 *f = rxbuf[i];
        u32 len = rx[i].len;
        check((rx[i].status & 3) == 3 && !rx[i].err, 50, "rx descriptor DD|EOP, no error");
        u32 plen = len - 4 - 14;       /* the FCS is counted */
        char head[21];
        u32 hl = plen < 20 ? plen : 20;
        memcpy(head, f + 14, hl);
        head[hl] = 0;
        for (u32 k = 0; k < hl; k++)
            if (head[k] < 32 || head[k] > 126) head[k] = '.';
        printf("rx len=%u dst=%02x:%02x:%02x:%02x:%02x:%02x sum=%x payload=%s\n", len,
               f[0], f[1], f[2], f[3], f[4], f[5], payload_sum(f + 14, plen), head);
        frames++;
        int end = !memcmp(f + 14, "pyvmm-end", 9);
        give_back((u32)i);
        if (end)
            break;
    }
    (void)icr();
    check(icr_seen & ICR_RXT0, 51, "RXT0 after received frames");
    check(frames > NRX, 52, "receive ring wrapped");
    if (arg_u64("bad", 0))
        bad_driver(dev);
    printf("e1000: all passed (frames=%u)\n", frames);
    return 0;
}
