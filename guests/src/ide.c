/* ide: a legacy IDE/ATA driver at CPL3 for pyvmm's PIIX3 IDE function (or QEMU's).
 * Finds the disks by probing the fixed ports (register echo, then the signature after
 * a software reset), not by enumeration; IDENTIFY; PIO writes and reads (LBA28, and
 * LBA48 past 2^28 when the disk is that large), READ/WRITE MULTIPLE, SET FEATURES,
 * FLUSH CACHE, power modes, EXECUTE DEVICE DIAGNOSTIC, nIEN; then bus-master DMA
 * through BMIBA (the one place PCI is used: to find BAR4), and what a buggy driver
 * does: addresses past the end, unknown commands, DMA outside RAM, PRD tables that end
 * early or never end, bus mastering off, the engine started before its command.
 * Interrupts: IRQ 14/15 through the 8259 pair (route=1) or the IOAPIC (route=2).
 * One line per check ("ok ..." or "ide <what> ..." for values a host test compares);
 * a failure prints FAIL and exits with its own code. */
#include "pci.h"

#define CMD0 0x1F0
#define CTL0 0x3F6
#define SPIN 20000000ul
#define QUIET 3000000ul       /* pauses to wait before concluding "nothing came" */

#define ST_BSY 0x80
#define ST_DRDY 0x40
#define ST_DRQ 0x08
#define ST_ERR 0x01
#define ST_MASK (ST_BSY | ST_DRDY | ST_DRQ | ST_ERR)  /* bit 4 (DSC) is obsolete */
#define ER_ABRT 0x04
#define ER_IDNF 0x10
#define BM_ACTIVE 1
#define BM_ERR 2
#define BM_INT 4

static u8 wbuf[256 * 512] __attribute__((aligned(65536)));
static u8 rbuf[256 * 512] __attribute__((aligned(65536)));
static u8 big[65536 * 512] __attribute__((aligned(65536)));   /* 65536 sectors: 32 MiB */
static u32 prd[8192 * 2] __attribute__((aligned(65536)));     /* 64 KiB: the most a table holds */
static u16 id[256];
static u16 bm;                  /* BMIBA */
static u32 pdev, pfn;           /* the IDE function */
static u32 words_read, words_written;  /* PIO data words moved through the Data register */
static u64 sectors, l48;        /* capacity; where the 48-bit tests write */

static u32 irqs(void) { return irq_count[14]; }
static u8 alt(void) { return inb(CTL0); }
static u8 status(void) { return inb(CMD0 + 7); }   /* acknowledges INTRQ */
static void quiet(void) { for (u64 i = 0; i < QUIET; i++) cpu_relax(); }

static void check(int cond, int code, const char *what)
{
    if (!cond) {
        printf("FAIL[%d]: %s (status=%02x error=%02x bm=%02x)\n", code, what, alt(),
               inb(CMD0 + 1), bm ? inb(bm + 2) : 0);
        exit((u32)code);
    }
    printf("ok %s\n", what);
}

static u8 not_busy(void)
{
    for (u64 i = 0; i < SPIN / 64; i++) {
        u8 s = alt();
        if (!(s & ST_BSY))
            return s;
    }
    fail("BSY never cleared");
    return 0;
}

static void wait_intr(u32 want, int code, const char *what)
{
    /* Seen once in CI beside a busy loop (kernel irqchip, 8259 route): the first IRQ 14
     * never arrived within SPIN. Not reproduced since; the guess is that an interrupt
     * raised while the vCPU sat in the CPL0 port stub (IF=0) may wait on KVM-PVM for
     * the vCPU's next entry, which a guest spinning at CPL3 never makes. So the wait
     * exits now and then (a read of the POST port, no IDE register) and is 4x longer. */
    for (int i = 0; i < 64; i++) {
        if (wait_irq(0x4e, want, SPIN / 16))
            return;
        (void)inb(0x80);
    }
    if (!wait_irq(0x4e, want, 1)) {
        printf("FAIL[%d]: no IRQ 14 for %s (irqs=%u want=%u)\n", code, what, irqs(), want);
        exit((u32)code);
    }
}

static void regs28(u32 lba, u32 count, u8 feature)
{
    outb(CMD0 + 6, 0xE0 | ((lba >> 24) & 0x0F));  /* LBA, device 0 */
    outb(CMD0 + 1, feature);
    outb(CMD0 + 2, (u8)count);
    outb(CMD0 + 3, (u8)lba);
    outb(CMD0 + 4, (u8)(lba >> 8));
    outb(CMD0 + 5, (u8)(lba >> 16));
}

static void regs48(u64 lba, u32 count)
{
    outb(CMD0 + 6, 0x40);
    outb(CMD0 + 2, (u8)(count >> 8));   /* high-order bytes first: they shift into HOB */
    outb(CMD0 + 3, (u8)(lba >> 24));
    outb(CMD0 + 4, (u8)(lba >> 32));
    outb(CMD0 + 5, (u8)(lba >> 40));
    outb(CMD0 + 2, (u8)count);
    outb(CMD0 + 3, (u8)lba);
    outb(CMD0 + 4, (u8)(lba >> 8));
    outb(CMD0 + 5, (u8)(lba >> 16));
}

/* A non-data command: returns the status after its interrupt. */
static u8 nondata(u8 cmd, int code, const char *what)
{
    u32 before = irqs();
    outb(CMD0 + 7, cmd);
    wait_intr(before + 1, code, what);
    return status() & ST_MASK;
}

/* SRST (with nIEN: no interrupt from the reset), then device 0 selected and not busy.
 * Device 0 is selected after a reset, but a peer that keeps the old selection (QEMU)
 * ignores the Device register while the device it still thinks selected is busy, so
 * select it again until it is done. */
static void channel_reset(u16 base, u16 ctl)
{
    outb(ctl, 0x06);
    for (int i = 0; i < 4; i++)
        inb(ctl);               /* > 5 us */
    outb(ctl, 0x02);
    u64 i = 0;
    for (; i < SPIN / 64; i++) {
        outb(base + 6, 0xA0);
        u8 s = inb(ctl);
        if (s != 0xFF && !(s & ST_BSY) && (s & ST_DRDY))
            break;
    }
    if (i == SPIN / 64)
        fail("device 0 did not come out of reset (status %02x)", inb(ctl));
    inb(base + 7);
    outb(ctl, 0x00);
}

static void srst(void) { channel_reset(CMD0, CTL0); }

static void pattern(u8 *b, u32 n, u32 seed)
{
    for (u32 i = 0; i < n; i++)
        b[i] = (u8)(i * 7 + seed * 13 + 1);
}

static void pio_in(u8 *dst, u32 nwords)
{
    u16 *p = (u16 *)dst;
    for (u32 i = 0; i < nwords; i++)
        p[i] = inw(CMD0);
    words_read += nwords;
}

static void pio_out(const u8 *src, u32 nwords)
{
    const u16 *p = (const u16 *)src;
    for (u32 i = 0; i < nwords; i++)
        outw(CMD0, p[i]);
    words_written += nwords;
}

/* PIO data-in: an interrupt, then a block of `block` sectors, per block. */
static void pio_read(u8 cmd, u8 *dst, u32 n, u32 block, int code)
{
    u32 before = irqs();
    outb(CMD0 + 7, cmd);
    for (u32 done = 0; done < n;) {
        u32 k = n - done < block ? n - done : block;
        wait_intr(++before, code, "a data-in block");
        u8 s = status();
        if ((s & (ST_BSY | ST_DRQ | ST_ERR)) != ST_DRQ) {
            printf("FAIL[%d]: read command %x: status %02x error %02x at sector %u\n", code,
                   cmd, s, inb(CMD0 + 1), done);
            exit((u32)code);
        }
        pio_in(dst + 512 * done, 256 * k);
        done += k;
    }
    if ((alt() & ST_MASK) != ST_DRDY) {
        printf("FAIL[%d]: status after the last data-in block: %02x\n", code, alt());
        exit((u32)code);
    }
}

/* PIO data-out: DRQ for the first block at once, an interrupt after each block. */
static void pio_write(u8 cmd, const u8 *src, u32 n, u32 block, int code)
{
    u32 before = irqs();
    outb(CMD0 + 7, cmd);
    for (u32 done = 0; done < n;) {
        u32 k = n - done < block ? n - done : block;
        u8 s = alt();
        if ((s & (ST_BSY | ST_DRQ | ST_ERR)) != ST_DRQ) {
            printf("FAIL[%d]: write command %x: status %02x error %02x at sector %u\n", code,
                   cmd, s, inb(CMD0 + 1), done);
            exit((u32)code);
        }
        pio_out(src + 512 * done, 256 * k);
        done += k;
        wait_intr(++before, code, "a data-out block");
        s = status();
        if (s & ST_ERR) {
            printf("FAIL[%d]: write command %x: status %02x error %02x\n", code, cmd, s,
                   inb(CMD0 + 1));
            exit((u32)code);
        }
    }
}

static void identify(int code)
{
    regs28(0, 0, 0);
    pio_read(0xEC, (u8 *)id, 1, 1, code);
}

static void ata_string(char *out, int word, int nwords)
{
    for (int i = 0; i < nwords; i++) {
        out[2 * i] = (char)(id[word + i] >> 8);
        out[2 * i + 1] = (char)id[word + i];
    }
    out[2 * nwords] = 0;
    for (int i = 2 * nwords - 1; i >= 0 && out[i] == ' '; i--)
        out[i] = 0;
}

/* Register echo (what Linux's ata_devchk does), then the signature left by SRST. */
static int probe(u16 base, u16 ctl, int unit)
{
    outb(base + 6, 0xA0 | (unit << 4));
    outb(base + 2, 0x55); outb(base + 3, 0xAA);
    outb(base + 2, 0xAA); outb(base + 3, 0x55);
    outb(base + 2, 0x55); outb(base + 3, 0xAA);
    int echo = inb(base + 2) == 0x55 && inb(base + 3) == 0xAA;
    u8 s0 = inb(ctl);
    if (!echo || s0 == 0xFF || s0 == 0x00)
        return 0;               /* an empty channel: floating (0xFF) or, on QEMU, 0 */
    channel_reset(base, ctl);
    outb(base + 6, 0xA0 | (unit << 4));
    u8 s = inb(ctl);
    int sig = inb(base + 2) == 1 && inb(base + 3) == 1 && inb(base + 4) == 0 && inb(base + 5) == 0;
    outb(base + 6, 0xA0);
    return echo && sig && s != 0xFF && (s & ST_DRDY);
}

static void find_function(void)
{
    for (u32 d = 0; d < 32; d++)
        for (u32 f = 0; f < 8; f++) {
            u32 idreg = pci_read32(0, d, f, 0);
            if ((idreg & 0xffff) == 0xffff)
                continue;
            u32 cls = pci_read32(0, d, f, 8) >> 8;
            if ((cls >> 8) == 0x0101) {
                pdev = d;
                pfn = f;
                bm = (u16)(pci_read32(0, d, f, 0x20) & ~3u);
                printf("ide pci 00:%02x.%x %04x:%04x class=%06x bmiba=%x\n", d, f,
                       idreg & 0xffff, idreg >> 16, cls, bm);
                return;
            }
        }
    fail("no IDE function (class 01:01) on bus 0");
}

static void set_bus_master(int on)
{
    u16 cmd = pci_read16(0, pdev, pfn, 4);
    pci_write16(0, pdev, pfn, 4, on ? (cmd | 5) : ((cmd | 1) & ~4));
}

static void prd_set(int i, const void *addr, u32 bytes, int eot)
{
    prd[2 * i] = (u32)(u64)addr;
    prd[2 * i + 1] = (bytes & 0xfffe) | (eot ? 0x80000000u : 0);
}

/* Set the engine up and issue a DMA command; `start` first or after the command. */
static void dma_issue(u8 cmd, int to_memory, const void *table)
{
    outb(bm, 0);                            /* stopped */
    outb(bm + 2, BM_INT | BM_ERR);          /* clear interrupt and error */
    outl(bm + 4, (u32)(u64)table);
    outb(bm, to_memory ? 0x08 : 0x00);
    outb(CMD0 + 7, cmd);
    outb(bm, to_memory ? 0x09 : 0x01);      /* start */
}

/* A DMA command that must complete: returns the bus-master status at its interrupt. */
static u8 dma(u8 cmd, int to_memory, int code, const char *what)
{
    u32 before = irqs();
    dma_issue(cmd, to_memory, prd);
    wait_intr(before + 1, code, what);
    u8 b = inb(bm + 2);
    outb(bm, 0);
    u8 s = status() & ST_MASK;
    if (s != ST_DRDY) {
        printf("FAIL[%d]: %s: status %02x error %02x bm %02x\n", code, what, s, inb(CMD0 + 1), b);
        exit((u32)code);
    }
    outb(bm + 2, BM_INT);
    return b & 7;
}

static void irq_setup(u64 route)
{
    /* Firmware (SeaBIOS under QEMU) leaves the PIT ticking into IRQ 0 at its vector 8,
     * and ICW1 unmasks everything before ICW2 moves the vectors: a tick in between would
     * arrive as exception 8. So mask, turn the PIT into a one-shot of one clock (its
     * single edge lands while masked, and ICW1 clears latched edges), then initialise. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    outb(0x43, 0x30);
    outb(0x40, 1);
    outb(0x40, 0);
    for (int i = 0; i < 4; i++)
        inb(0x61);                  /* > 1 us */
    outb(0x20, 0x11); outb(0x21, 0x40); outb(0x21, 0x04); outb(0x21, 0x03);
    outb(0xa0, 0x11); outb(0xa1, 0x48); outb(0xa1, 0x02); outb(0xa1, 0x03);
    if (route == 1) {
        outb(0x21, 0xfb);           /* cascade only */
        outb(0xa1, 0x3f);           /* IRQ 14 and 15: vectors 0x4e, 0x4f */
    } else {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
        ioapic_route(14, 0x4e, 0, 0);
        ioapic_route(15, 0x4f, 0, 0);
    }
}

static void other_disks(int present[2][2])
{
    static const u16 cmdp[2] = { 0x1F0, 0x170 };
    for (int b = 0; b < 2; b++)
        for (int u = 0; u < 2; u++) {
            if (!present[b][u] || (b == 0 && u == 0))
                continue;
            u16 base = cmdp[b];
            u32 before = irq_count[14 + b];
            outb(base + 6, 0xA0 | (u << 4));
            outb(base + 7, 0xEC);
            if (!wait_irq((u8)(0x4e + b), before + 1, SPIN))
                fail("no IRQ %u for IDENTIFY of %d.%d", 14 + b, b, u);
            inb(base + 7);
            for (int i = 0; i < 256; i++)
                id[i] = inw(base);
            char serial[21];
            ata_string(serial, 10, 10);
            u64 n = id[100] | (u64)id[101] << 16 | (u64)id[102] << 32 | (u64)id[103] << 48;
            printf("ide disk %d.%d serial='%s' sectors=%lu irq=%u\n", b, u, serial, n, 14 + b);
            outb(base + 6, 0xA0);
        }
}

/* bench=N: N random 4 KiB reads at QD1, by PIO (READ MULTIPLE, one 8-sector block and
 * one interrupt a request: 2048 Data-register words) or by DMA (READ DMA, one PRD);
 * guest TSC cycles per request, p50/p99. */
static u64 lat[4096];

static void bench(u64 n, u64 dma_mode)
{
    if (n > 4096)
        n = 4096;
    regs28(0, 8, 0);
    if (nondata(0xC6, 60, "bench: set multiple 8") != ST_DRDY)
        fail("bench: SET MULTIPLE MODE 8");
    if (dma_mode) {
        find_function();
        set_bus_master(1);
        prd_set(0, rbuf, 4096, 1);
    }
    u64 x = 12345, span = sectors < (1ul << 28) ? sectors : (1ul << 28);
    for (u64 i = 0; i < n; i++) {
        x = x * 6364136223846793005ul + 1442695040888963407ul;
        u32 lba = (u32)(((x >> 20) % (span / 8)) * 8);
        u64 t0 = rdtsc();
        regs28(lba, 8, 0);
        if (dma_mode)
            dma(0xC8, 1, 61, "bench READ DMA");
        else
            pio_read(0xC4, rbuf, 8, 8, 62);
        lat[i] = rdtsc() - t0;
    }
    for (u64 i = 1; i < n; i++)              /* insertion sort: n is small */
        for (u64 j = i; j > 0 && lat[j - 1] > lat[j]; j--) {
            u64 t = lat[j]; lat[j] = lat[j - 1]; lat[j - 1] = t;
        }
    printf("ide-bench mode=%s reads=%lu p50_cycles=%lu p99_cycles=%lu\n",
           dma_mode ? "dma" : "pio", n, lat[n / 2], lat[n * 99 / 100]);
}

int main(void)
{
    uart_init();
    irq_init();
    lapic_enable();
    pci_mech = PCI_MECH_CF8;        /* i440FX machines have no ECAM */
    u64 route = arg_u64("route", 2);
    irq_setup(route);
    printf("ide route=%lu (%s)\n", route, route == 1 ? "8259" : "IOAPIC");

    /* --- finding the disks: ports, not enumeration ------------------------------------ */
    int present[2][2];
    static const char *chname[2] = { "primary", "secondary" };
    for (int b = 0; b < 2; b++)
        for (int u = 0; u < 2; u++) {
            present[b][u] = probe(b ? 0x170 : 0x1F0, b ? 0x376 : 0x3F6, u);
            printf("ide probe %s unit %d: %s\n", chname[b], u, present[b][u] ? "present" : "absent");
        }
    check(present[0][0], 2, "a device 0 on the primary channel");
    srst();
    check((alt() & ST_MASK) == ST_DRDY && inb(CMD0 + 1) == 0x01, 3,
          "after SRST: DRDY, diagnostic code 01h");
    check(inb(CMD0 + 2) == 1 && inb(CMD0 + 3) == 1 && inb(CMD0 + 4) == 0 && inb(CMD0 + 5) == 0,
          4, "ATA signature 01 01 00 00");

    /* --- IDENTIFY ----------------------------------------------------------------------- */
    identify(5);
    u8 sum = 0;
    for (int i = 0; i < 512; i++)
        sum += ((u8 *)id)[i];
    /* Word 255 is optional: A5h in its low byte says the checksum byte is valid. */
    printf("ide integrity word=%04x sum=%02x\n", id[255], sum);
    check((id[255] & 0xff) != 0xa5 || sum == 0, 6, "IDENTIFY integrity word (if any) checks");
    char model[41], serial[21], fw[9];
    ata_string(model, 27, 20);
    ata_string(serial, 10, 10);
    ata_string(fw, 23, 4);
    u32 lba28 = id[60] | (u32)id[61] << 16;
    sectors = id[100] | (u64)id[101] << 16 | (u64)id[102] << 32 | (u64)id[103] << 48;
    printf("ide model='%s' serial='%s' firmware='%s'\n", model, serial, fw);
    printf("ide lba28=%u lba48=%lu max_multiple=%u w49=%04x w53=%04x w59=%04x w63=%04x "
           "w88=%04x w83=%04x w86=%04x\n", lba28, sectors, id[47] & 0xff, id[49], id[53], id[59],
           id[63], id[88], id[83], id[86]);
    check((id[83] & 0x0400) && (id[86] & 0x0400) && sectors > 0, 7, "48-bit addresses");
    check((id[49] & 0x0300) == 0x0300 && (id[47] & 0xff) >= 4, 8, "LBA, DMA, multiple >= 4");
    l48 = sectors > (1ul << 28) + 4096 ? (1ul << 28) + 0x1234 : 4096;
    printf("ide lba48 tests at %lu\n", l48);
    u64 nbench = arg_u64("bench", 0);
    if (nbench) {               /* only the workload: what a benchmark compares */
        bench(nbench, arg_u64("bench_mode", 0));
        return 0;
    }

    regs28(0, 0x46, 0x03);          /* SET FEATURES: Ultra DMA mode 6, not offered */
    u8 s6 = nondata(0xEF, 9, "set transfer mode UDMA6");
    printf("ide set-udma6 status=%02x error=%02x\n", s6, inb(CMD0 + 1));
    regs28(0, 0x22, 0x03);          /* SET FEATURES: multiword DMA mode 2 */
    check(nondata(0xEF, 9, "set transfer mode") == ST_DRDY, 9, "set transfer mode MWDMA2");
    identify(10);
    check(id[63] == 0x0407, 10, "IDENTIFY word 63: MWDMA2 selected");

    /* --- PIO, 28-bit and 48-bit addresses ------------------------------------------------ */
    pattern(wbuf, 4 * 512, 1);
    regs28(100, 4, 0);
    u32 i0 = irqs();
    pio_write(0x30, wbuf, 4, 1, 11);
    check(irqs() - i0 == 4, 11, "WRITE SECTORS 4 at LBA 100: an interrupt per sector");
    memset(rbuf, 0, 4 * 512);
    regs28(100, 4, 0);
    i0 = irqs();
    pio_read(0x20, rbuf, 4, 1, 12);
    check(irqs() - i0 == 4 && !memcmp(rbuf, wbuf, 4 * 512), 12, "READ SECTORS 4 at LBA 100");
    outb(CMD0 + 3, 0x12); outb(CMD0 + 3, 0x34);
    outb(CTL0, 0x80);
    u8 hob = inb(CMD0 + 3);
    outb(CTL0, 0x00);
    check(hob == 0x12 && inb(CMD0 + 3) == 0x34, 13, "HOB reads the previous LBA Low");
    pattern(wbuf, 2 * 512, 2);
    regs48(l48, 2);
    pio_write(0x34, wbuf, 2, 1, 14);
    memset(rbuf, 0, 1024);
    regs48(l48, 2);
    pio_read(0x24, rbuf, 2, 1, 15);
    check(!memcmp(rbuf, wbuf, 1024), 15, "WRITE/READ SECTORS EXT 2 at the 48-bit LBA");

    /* --- multiple mode ------------------------------------------------------------------ */
    regs28(0, 3, 0);
    check(nondata(0xC6, 16, "set multiple 3") & ST_ERR && (inb(CMD0 + 1) & ER_ABRT), 16,
          "SET MULTIPLE MODE 3 (not a power of two): ABRT");
    regs28(0, 4, 0);
    check(nondata(0xC6, 17, "set multiple 4") == ST_DRDY, 17, "SET MULTIPLE MODE 4");
    pattern(wbuf, 8 * 512, 3);
    regs28(200, 8, 0);
    i0 = irqs();
    pio_write(0xC5, wbuf, 8, 4, 18);
    check(irqs() - i0 == 2, 18, "WRITE MULTIPLE 8 at LBA 200: an interrupt per 4-sector block");
    memset(rbuf, 0, 8 * 512);
    regs28(200, 8, 0);
    pio_read(0xC4, rbuf, 8, 4, 19);
    check(!memcmp(rbuf, wbuf, 8 * 512), 19, "READ MULTIPLE 8 at LBA 200");
    pattern(wbuf, 6 * 512, 4);
    regs48(l48 + 64, 6);
    pio_write(0x39, wbuf, 6, 4, 20);
    memset(rbuf, 0, 6 * 512);
    regs48(l48 + 64, 6);
    pio_read(0x29, rbuf, 6, 4, 21);
    check(!memcmp(rbuf, wbuf, 6 * 512), 21, "WRITE/READ MULTIPLE EXT 6 (blocks 4 + 2)");

    /* --- cache, power, diagnostics, nIEN ------------------------------------------------- */
    check(nondata(0xE7, 22, "flush") == ST_DRDY, 22, "FLUSH CACHE");
    check(nondata(0xEA, 23, "flush ext") == ST_DRDY, 23, "FLUSH CACHE EXT");
    regs28(0, 0, 0x82);
    check(nondata(0xEF, 24, "wc off") == ST_DRDY, 24, "SET FEATURES write cache off");
    identify(25);
    check(!(id[85] & 0x20), 25, "IDENTIFY word 85: write cache disabled");
    regs28(0, 0, 0x02);
    check(nondata(0xEF, 26, "wc on") == ST_DRDY, 26, "SET FEATURES write cache on");
    identify(27);
    check(id[85] & 0x20, 27, "IDENTIFY word 85: write cache enabled");
    check(nondata(0xE0, 28, "standby immediate") == ST_DRDY, 28, "STANDBY IMMEDIATE");
    nondata(0xE5, 29, "check power mode");
    u8 pm_standby = inb(CMD0 + 2);
    check(nondata(0xE1, 29, "idle immediate") == ST_DRDY, 29, "IDLE IMMEDIATE");
    nondata(0xE5, 29, "check power mode");
    u8 pm_idle = inb(CMD0 + 2);
    printf("ide power after-standby=%02x after-idle=%02x\n", pm_standby, pm_idle);
    check(pm_idle == 0xff, 30, "CHECK POWER MODE: active or idle");
    check(nondata(0x90, 31, "diagnostic") == ST_DRDY && inb(CMD0 + 1) == 0x01
          && inb(CMD0 + 2) == 1 && inb(CMD0 + 3) == 1, 31,
          "EXECUTE DEVICE DIAGNOSTIC: 01h, signature, an interrupt");
    outb(CTL0, 0x02);               /* nIEN */
    i0 = irqs();
    outb(CMD0 + 7, 0xE5);
    not_busy();
    quiet();
    u32 held = irqs() - i0;
    outb(CTL0, 0x00);               /* the interrupt is still pending (status not read) */
    quiet();
    u32 late = irqs() - i0;
    status();
    printf("ide nien held=%u after-clearing=%u\n", held, late);
    check(held == 0, 32, "nIEN holds INTRQ back");

    /* --- errors ------------------------------------------------------------------------- */
    regs48(sectors, 1);
    u8 s = nondata(0x24, 33, "read past the end");
    u8 e = inb(CMD0 + 1);
    printf("ide past-the-end status=%02x error=%02x\n", s, e);
    check((s & ST_ERR) && (e & (ER_IDNF | ER_ABRT)), 33, "READ SECTORS EXT past the end: ERR");
    s = nondata(0x0F, 34, "unknown command");
    check((s & ST_ERR) && inb(CMD0 + 1) == ER_ABRT, 34, "unknown command 0Fh: ABRT");
    s = nondata(0x08, 35, "device reset");
    check((s & ST_ERR) && inb(CMD0 + 1) == ER_ABRT, 35,
          "DEVICE RESET on a non-PACKET device: ABRT");
    regs28(0, 4, 0);
    pio_read(0xC4, rbuf, 4, 4, 36);  /* leaves nothing pending: a whole block read */

    /* --- bus-master DMA ------------------------------------------------------------------- */
    find_function();
    check(bm != 0, 37, "BMIBA (BAR4) assigned");
    set_bus_master(1);
    pattern(wbuf, 8 * 512, 5);
    prd_set(0, wbuf, 1024, 0);
    prd_set(1, wbuf + 1024, 3072, 1);
    regs28(300, 8, 0);
    check(dma(0xCA, 0, 38, "WRITE DMA") == BM_INT, 38,
          "WRITE DMA 8 at LBA 300 through two PRDs: inactive, interrupt");
    memset(rbuf, 0, 8 * 512);
    prd_set(0, rbuf, 4096, 1);
    regs28(300, 8, 0);
    check(dma(0xC8, 1, 39, "READ DMA") == BM_INT && !memcmp(rbuf, wbuf, 8 * 512), 39,
          "READ DMA 8 at LBA 300");
    pattern(wbuf, 128 * 512, 6);
    prd_set(0, wbuf, 0, 1);         /* byte count 0: 64 KiB */
    regs48(l48 + 256, 128);
    check(dma(0x35, 0, 40, "WRITE DMA EXT") == BM_INT, 40,
          "WRITE DMA EXT 128 through one 64 KiB PRD (count 0)");
    memset(rbuf, 0, 128 * 512);
    prd_set(0, rbuf, 0, 1);
    regs48(l48 + 256, 128);
    check(dma(0x25, 1, 41, "READ DMA EXT") == BM_INT && !memcmp(rbuf, wbuf, 128 * 512), 41,
          "READ DMA EXT 128");
    pattern(wbuf, 256 * 512, 7);
    prd_set(0, wbuf, 0, 0);
    prd_set(1, wbuf + 65536, 0, 1);
    regs28(1024, 0, 0);             /* count 0: 256 sectors */
    check(dma(0xCA, 0, 42, "WRITE DMA 256") == BM_INT, 42,
          "WRITE DMA with count 0 (256 sectors) at LBA 1024");
    for (int i = 0; i < 512; i++)
        prd_set(i, big + 65536ul * i, 0, i == 511);
    regs48(0, 0);                   /* count 0: 65536 sectors */
    check(dma(0x25, 1, 43, "READ DMA EXT 65536") == BM_INT, 43,
          "READ DMA EXT with count 0 (65536 sectors, 32 MiB) from LBA 0");
    pattern(rbuf, 4 * 512, 1);
    int same = !memcmp(big + 100 * 512, rbuf, 4 * 512);
    pattern(rbuf, 8 * 512, 5);
    same = same && !memcmp(big + 300 * 512, rbuf, 8 * 512);
    pattern(rbuf, 256 * 512, 7);
    same = same && !memcmp(big + 1024 * 512, rbuf, 256 * 512);
    check(same, 44, "the 32 MiB read holds what PIO and DMA wrote");

    /* the engine started before the command (its start bit, no command pending yet) */
    memset(rbuf, 0, 512);
    prd_set(0, rbuf, 512, 1);
    outb(bm, 0);
    outb(bm + 2, BM_INT | BM_ERR);
    outl(bm + 4, (u32)(u64)prd);
    outb(bm, 0x09);
    quiet();
    u8 b = inb(bm + 2) & 7;
    check(b == BM_ACTIVE, 45, "start bit with no command pending: active, waiting");
    regs28(300, 1, 0);
    i0 = irqs();
    outb(CMD0 + 7, 0xC8);
    wait_intr(i0 + 1, 46, "READ DMA after the start bit");
    b = inb(bm + 2) & 7;
    outb(bm, 0);
    pattern(wbuf, 512, 5);
    check(b == BM_INT && (status() & ST_MASK) == ST_DRDY && !memcmp(rbuf, wbuf, 512), 46,
          "then the command: it runs");
    outb(bm + 2, BM_INT);

    /* PRDs larger than the transfer, and without EOT */
    prd_set(0, rbuf, 4096, 0);
    regs28(300, 1, 0);
    b = dma(0xC8, 1, 47, "READ DMA, larger PRD");
    check(b == (BM_ACTIVE | BM_INT), 47, "PRD larger than the transfer, no EOT: active + interrupt");

    /* PRDs shorter than the transfer: EOT too early */
    prd_set(0, rbuf, 512, 1);
    regs28(300, 2, 0);
    i0 = irqs();
    dma_issue(0xC8, 1, prd);
    quiet();
    b = inb(bm + 2) & 7;
    printf("ide short-prd bm=%02x irqs=%u status=%02x\n", b, irqs() - i0, alt());
    check(b == 0 && irqs() == i0, 48, "PRD smaller than the transfer: inactive, no interrupt");
    outb(bm, 0);
    srst();

    /* a table that never ends: 8192 entries of 2 bytes, no EOT, 32 KiB asked */
    for (int i = 0; i < 8192; i++)
        prd_set(i, rbuf + 2 * i, 2, 0);
    regs28(300, 64, 0);
    i0 = irqs();
    dma_issue(0xC8, 1, prd);
    quiet();
    b = inb(bm + 2) & 7;
    printf("ide no-eot bm=%02x irqs=%u status=%02x\n", b, irqs() - i0, alt());
    check(b == 0 && irqs() == i0, 49, "PRD table without EOT: walk bounded, inactive, no interrupt");
    outb(bm, 0);
    srst();

    /* DMA to memory outside RAM */
    prd_set(0, (void *)0xF0000000ul, 512, 1);
    regs28(300, 1, 0);
    i0 = irqs();
    dma_issue(0xC8, 1, prd);
    int got = wait_irq(0x4e, i0 + 1, SPIN);
    b = inb(bm + 2) & 7;
    s = status() & ST_MASK;
    printf("ide dma-outside-ram irq=%d bm=%02x status=%02x error=%02x\n", got, b, s,
           inb(CMD0 + 1));
    check(got && ((b & BM_ERR) || s == ST_DRDY), 50, "DMA outside RAM: bus-master ERR (or discarded)");
    outb(bm, 0);
    srst();

    /* a PRD table outside RAM (a write: no guest memory is at risk) */
    regs28(5000, 1, 0);
    i0 = irqs();
    dma_issue(0xCA, 0, (void *)0xF0000000ul);
    got = wait_irq(0x4e, i0 + 1, SPIN);
    b = inb(bm + 2) & 7;
    s = status() & ST_MASK;
    printf("ide prd-outside-ram irq=%d bm=%02x status=%02x error=%02x\n", got, b, s,
           inb(CMD0 + 1));
    outb(bm, 0);
    srst();

    /* bus mastering off in the PCI command register */
    set_bus_master(0);
    memset(rbuf, 0xee, 512);
    prd_set(0, rbuf, 512, 1);
    regs28(300, 1, 0);
    i0 = irqs();
    dma_issue(0xC8, 1, prd);
    quiet();
    u32 irq_off = irqs() - i0;
    b = inb(bm + 2) & 7;
    int moved_off = rbuf[0] != 0xee;
    set_bus_master(1);
    got = wait_irq(0x4e, i0 + 1, SPIN);
    pattern(wbuf, 512, 5);
    int moved_on = !memcmp(rbuf, wbuf, 512);
    printf("ide bme-off irq=%u bm=%02x moved=%d; bme-on irq=%d moved=%d\n", irq_off, b,
           moved_off, got, moved_on);
    check(got, 51, "bus mastering off, then on: the interrupt comes");
    outb(bm, 0);
    outb(bm + 2, BM_INT | BM_ERR);
    srst();

    /* still a working disk */
    memset(rbuf, 0, 512);
    prd_set(0, rbuf, 512, 1);
    regs28(300, 1, 0);
    check(dma(0xC8, 1, 52, "READ DMA after the errors") == BM_INT && !memcmp(rbuf, wbuf, 512),
          52, "DMA works after the bad input");

    other_disks(present);
    printf("ide pio-words read=%u written=%u\n", words_read, words_written);
    printf("ide: all passed (irqs=%u)\n", irqs());
    return 0;
}
