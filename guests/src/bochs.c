/* bochs: a Bochs VBE / QEMU std-VGA driver as Linux's bochs DRM driver is: find the
 * display (1234:1111, class 0x0300) on bus 0, check the DISPI ID through the ports and
 * through BAR2's MMIO view, read the capabilities (GETCAPS), set a mode (w x h x 32,
 * LFB), draw a test pattern into BAR0 (guest memory in a dirty-logged memslot: no exit
 * per store) and report its checksum. Bad values are tried first: BPP 7 and a huge
 * XRES come back fixed up. hold=1 spins after reporting, so that a host (QEMU's
 * screendump in tests/e2e) can take the screen. */
#include "pci.h"

#define DISPI_INDEX 0x1CE
#define DISPI_DATA 0x1CF
enum { ID, XRES, YRES, BPP, ENABLE, BANK, VIRT_W, VIRT_H, X_OFF, Y_OFF, VMEM64K };
#define ENABLED 0x01
#define GETCAPS 0x02
#define LFB 0x40
#define NOCLEARMEM 0x80

static void dw(u16 i, u16 v) { outw(DISPI_INDEX, i); outw(DISPI_DATA, v); }
static u16 dr(u16 i) { outw(DISPI_INDEX, i); return inw(DISPI_DATA); }

static void check(int cond, const char *what)
{
    if (!cond)
        fail("%s", what);
    printf("ok %s\n", what);
}

static u32 w, h;

static u32 pattern(u32 x, u32 y)
{
    /* Colour bars across, a gradient down, a white frame: easy to see and to check. */
    static const u32 bars[8] = {0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00,
                                0xFF00FF, 0xFF0000, 0x0000FF, 0x000000};
    if (x == 0 || y == 0 || x == w - 1 || y == h - 1)
        return 0xFFFFFF;
    if (y < h / 2)
        return bars[x * 8 / w];
    u32 g = (x * 255 / w) & 0xFF;
    return g << 16 | ((y * 255 / h) & 0xFF) << 8 | (255 - g);
}

int main(void)
{
    uart_init();
    w = (u32)arg_u64("w", 640);
    h = (u32)arg_u64("h", 480);
    int dev = -1;
    for (int d = 0; d < 32; d++)
        if (pci_read32(0, d, 0, 0) == 0x11111234 && (pci_read32(0, d, 0, 8) >> 16) == 0x0300)
            dev = d;
    check(dev >= 0, "std VGA 1234:1111 class 0x0300 found");
    u64 fb = pci_bar_addr(0, dev, 0, 0), mmio = pci_bar_addr(0, dev, 0, 2);
    check(fb != 0 && (pci_read32(0, dev, 0, 0x10) & 8), "BAR0: prefetchable framebuffer");
    check(mmio != 0, "BAR2: MMIO registers");
    printf("bochs: device %d fb %lx mmio %lx\n", dev, fb, mmio);

    dw(ID, 0xB0C0);
    check(dr(ID) == 0xB0C0, "DISPI ID accepts 0xb0c0");
    dw(ID, 0x1234);
    check(dr(ID) == 0xB0C0, "DISPI ID ignores an unknown version");
    dw(ID, 0xB0C5);
    volatile u16 *regs = (volatile u16 *)(mmio + 0x500);
    check(regs[ID] == 0xB0C5, "DISPI ID 0xb0c5 through BAR2 (0x500 + index * 2)");
    u32 vram = (u32)dr(VMEM64K) << 16;
    printf("bochs: video memory %u KiB\n", vram >> 10);
    check(vram >= (4u << 20), "video memory reported in 64 KiB units");

    dw(ENABLE, GETCAPS);
    printf("bochs: caps %ux%ux%u\n", dr(XRES), dr(YRES), dr(BPP));
    check(dr(XRES) >= 1024 && dr(BPP) == 32, "GETCAPS: maximum XRES, YRES, BPP");
    dw(ENABLE, 0);

    /* Bad values: fixed up when the mode is enabled, as QEMU does. */
    dw(XRES, 60000);
    dw(YRES, 480);
    dw(BPP, 7);
    dw(ENABLE, ENABLED | LFB);
    printf("bochs: bad mode became %ux%ux%u\n", dr(XRES), dr(YRES), dr(BPP));
    check(dr(BPP) == 8, "BPP 7 becomes 8");
    check(dr(XRES) <= 16000 && (dr(XRES) & 7) == 0, "a huge XRES is clamped");
    dw(ENABLE, 0);

    /* The mode, through BAR2 this time (what Linux's bochs driver uses). */
    regs[XRES] = (u16)w;
    regs[YRES] = (u16)h;
    regs[BPP] = 32;
    regs[ENABLE] = ENABLED | LFB;
    check(dr(XRES) == w && dr(YRES) == h && dr(BPP) == 32, "mode set");
    check(dr(VIRT_W) == w, "virtual width follows XRES");
    dw(Y_OFF, 60000);  /* past the framebuffer: reset to 0 */
    check(dr(Y_OFF) == 0, "a Y offset past the framebuffer is rejected");

    volatile u32 *px = (volatile u32 *)fb;
    u32 sum = 0;
    for (u32 y = 0; y < h; y++)
        for (u32 x = 0; x < w; x++) {
            u32 c = pattern(x, y);
            px[y * w + x] = c;
            sum = sum * 31 + c;
        }
    u32 back = 0;
    for (u32 y = 0; y < h; y++)
        for (u32 x = 0; x < w; x++)
            back = back * 31 + px[y * w + x];
    check(back == sum, "pattern reads back from the framebuffer");
    printf("bochs: mode %ux%ux32 pattern sum %08x\n", w, h, sum);
    printf("bochs: all passed\n");
    if (arg_u64("hold", 0))  /* keep the screen for a host that takes a screendump */
        for (;;)
            cpu_relax();
    return 0;
}
