/* ide_native: a CPL3 driver for pyvmm's IDE function in native-PCI mode (native=on),
 * found by enumeration as Linux's libata finds it: class 01 01 85, each channel's
 * Command Block at BAR0/BAR2 and Control Block at BAR1/BAR3 + 2, bus master at BAR4,
 * one INTx pin for both channels (routed through the IOAPIC by the interrupt line the
 * VMM wrote). Checks: the legacy ports are silent, IDENTIFY on both channels by INTx
 * (PCI_STATUS.INTERRUPT follows the line; reading Status drops it, Alternate Status does
 * not), a PIO write and read back, a bus-master DMA read whose checksum the host
 * compares with the image. One line per check; FAIL exits with its code. */
#include "pci.h"

#define SPIN 20000000ul
#define VEC 0x43
#define ST_BSY 0x80
#define ST_DRQ 0x08
#define ST_ERR 0x01
#define PCI_STATUS_INTERRUPT 0x08

static u32 pdev;
static u16 cmd[2], ctl[2], bm;
static u16 id[256];
static u8 wbuf[512], rbuf[512];
static u8 dbuf[8 * 512] __attribute__((aligned(4096)));
static u32 prd[2] __attribute__((aligned(4096)));

static void check(int cond, int code, const char *what)
{
    if (!cond) {
        printf("FAIL[%d]: %s\n", code, what);
        exit((u32)code);
    }
    printf("ok %s\n", what);
}

static int intx(void) { return pci_read16(0, pdev, 0, 6) & PCI_STATUS_INTERRUPT; }

static void not_busy(int ch)
{
    for (u64 i = 0; i < SPIN; i++)
        if (!(inb(ctl[ch]) & ST_BSY))
            return;
    fail("BSY never cleared on channel %d", ch);
}

static void regs28(int ch, u32 lba, u8 count)
{
    outb(cmd[ch] + 6, 0xE0 | ((lba >> 24) & 0x0F));
    outb(cmd[ch] + 2, count);
    outb(cmd[ch] + 3, lba & 0xFF);
    outb(cmd[ch] + 4, (lba >> 8) & 0xFF);
    outb(cmd[ch] + 5, (lba >> 16) & 0xFF);
}

int main(void)
{
    uart_init();
    irq_init();
    lapic_enable();
    pdev = 32;
    for (u32 d = 0; d < 32; d++)
        if (pci_read32(0, d, 0, 0) == 0x70108086)
            pdev = d;
    check(pdev < 32, 1, "found 8086:7010");
    u32 class = pci_read32(0, pdev, 0, 8) >> 8;
    printf("ide-native class=%06x pin=%u\n", class, pci_read8(0, pdev, 0, 0x3d));
    check(class == 0x010185, 2, "class 01 01 85: both channels native, bus master");
    for (int ch = 0; ch < 2; ch++) {
        cmd[ch] = (u16)pci_bar_addr(0, pdev, 0, 2 * ch);
        ctl[ch] = (u16)(pci_bar_addr(0, pdev, 0, 2 * ch + 1) + 2);
    }
    bm = (u16)pci_bar_addr(0, pdev, 0, 4);
    check(cmd[0] && cmd[1] && ctl[0] > 2 && ctl[1] > 2 && bm, 3, "BAR0-4 assigned");
    pci_write16(0, pdev, 0, 4, 0x5);           /* I/O space, bus master */
    check(inb(0x1F7) == 0xff && inb(0x3F6) == 0xff && inb(0x177) == 0xff, 4,
          "legacy ports silent");
    u8 gsi = pci_read8(0, pdev, 0, 0x3c);
    ioapic_route(gsi, VEC, 0, 0);

    for (int ch = 0; ch < 2; ch++) {
        u32 before = irq_count[VEC & 15];
        outb(cmd[ch] + 6, 0xA0);
        outb(cmd[ch] + 7, 0xEC);                /* IDENTIFY DEVICE */
        check(wait_irq(VEC, before + 1, SPIN), 10 + ch, "INTx for IDENTIFY");
        check(intx() && (inb(ctl[ch]) & ST_DRQ), 12 + ch,
              "line still high after Alternate Status");
        u8 s = inb(cmd[ch] + 7);
        check(!intx() && (s & ST_DRQ) && !(s & ST_ERR), 14 + ch, "Status read drops INTx");
        for (int i = 0; i < 256; i++)
            id[i] = inw(cmd[ch]);
        char model[41];
        for (int i = 0; i < 20; i++) {
            model[2 * i] = (char)(id[27 + i] >> 8);
            model[2 * i + 1] = (char)id[27 + i];
        }
        model[40] = 0;
        for (int i = 39; i >= 0 && model[i] == ' '; i--)
            model[i] = 0;
        u64 n = id[100] | (u64)id[101] << 16 | (u64)id[102] << 32 | (u64)id[103] << 48;
        printf("ide-native channel %d model='%s' sectors=%lu gsi=%u\n", ch, model, n, gsi);
    }

    /* PIO: WRITE SECTORS then READ SECTORS at LBA 8 of the primary disk */
    for (int i = 0; i < 512; i++)
        wbuf[i] = (u8)(i * 5 + 3);
    u32 before = irq_count[VEC & 15];
    regs28(0, 8, 1);
    outb(cmd[0] + 7, 0x30);
    not_busy(0);
    check(inb(ctl[0]) & ST_DRQ, 20, "WRITE SECTORS wants data");
    for (int i = 0; i < 256; i++)
        outw(cmd[0], (u16)(wbuf[2 * i] | wbuf[2 * i + 1] << 8));
    check(wait_irq(VEC, before + 1, SPIN), 21, "INTx after the written block");
    check(!(inb(cmd[0] + 7) & ST_ERR), 22, "write done");
    regs28(0, 8, 1);
    outb(cmd[0] + 7, 0x20);
    check(wait_irq(VEC, before + 2, SPIN), 23, "INTx for the read block");
    check(inb(cmd[0] + 7) & ST_DRQ, 24, "read data ready");
    for (int i = 0; i < 256; i++) {
        u16 w = inw(cmd[0]);
        rbuf[2 * i] = (u8)w;
        rbuf[2 * i + 1] = (u8)(w >> 8);
    }
    check(!memcmp(wbuf, rbuf, 512), 25, "PIO read back what was written");

    /* bus-master DMA: READ DMA of LBA 0-7 into dbuf */
    prd[0] = (u32)(u64)dbuf;
    prd[1] = (8 * 512) | 0x80000000u;          /* EOT */
    outl(bm + 4, (u32)(u64)prd);
    outb(bm + 2, 0x06);                        /* clear ERR and INT */
    regs28(0, 0, 8);
    outb(cmd[0] + 7, 0xC8);                    /* READ DMA */
    outb(bm, 0x09);                            /* start, write to memory */
    check(wait_irq(VEC, before + 3, SPIN), 30, "INTx for READ DMA");
    u8 bms = inb(bm + 2);
    outb(bm, 0);
    u8 s = inb(cmd[0] + 7);
    printf("ide-native dma bm=%02x status=%02x\n", bms, s);
    check((bms & 0x07) == 0x04 && !(s & ST_ERR), 31, "DMA done, interrupt bit, no error");
    u32 sum = 0;
    for (u32 i = 0; i < sizeof(dbuf); i++)
        sum = sum * 31 + dbuf[i];
    printf("ide-native dma-sum=%08x\n", sum);
    printf("ide-native: all passed\n");
    return 0;
}
