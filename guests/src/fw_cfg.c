/* fw-cfg: find QEMU's firmware configuration device the way firmware does (probe the
 * signature at its fixed port), then read what it offers through both interfaces: the
 * data port and DMA. Prints the ID, RAM size, CPUs, the file directory, the e820 file
 * and the file named by file= (default opt/pyvmm/test); exits 0 if the signature,
 * the DMA signature and the two reads of that file agree. */
#include "guest.h"

#define FW_CFG_SEL 0x510
#define FW_CFG_DATA 0x511
#define FW_CFG_DMA 0x514

static u32 bswap32(u32 v) { return __builtin_bswap32(v); }

static void sel(u16 key) { outw(FW_CFG_SEL, key); }

static void read_data(void *buf, u32 n)
{
    u8 *p = buf;
    for (u32 i = 0; i < n; i++)
        p[i] = inb(FW_CFG_DATA);
}

struct dma_access {
    u32 control;
    u32 length;
    u64 address;
} __attribute__((packed, aligned(16)));

static volatile struct dma_access dma;
static u8 dma_buf[256] __attribute__((aligned(16)));

/* select key and read n bytes by DMA; returns the control word left (0: done) */
static u32 dma_read(u16 key, void *dst, u32 n)
{
    dma.control = bswap32(((u32)key << 16) | 0x08 | 0x02); /* SELECT | READ */
    dma.length = bswap32(n);
    dma.address = __builtin_bswap64((u64)(unsigned long)dst);
    u64 a = (u64)(unsigned long)&dma;
    outl(FW_CFG_DMA, bswap32((u32)(a >> 32)));
    outl(FW_CFG_DMA + 4, bswap32((u32)a));
    return bswap32(dma.control);
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

int main(void)
{
    uart_init();
    char sig[5] = {0};
    sel(0x0000);
    read_data(sig, 4);
    printf("fw_cfg signature=%s\n", sig);
    if (!streq(sig, "QEMU")) {
        printf("FAIL: no fw_cfg\n");
        return 3;
    }
    u32 dsig_hi = bswap32(inl(FW_CFG_DMA)), dsig_lo = bswap32(inl(FW_CFG_DMA + 4));
    printf("fw_cfg dma signature=%08x%08x\n", dsig_hi, dsig_lo);
    u32 id;
    sel(0x0001);
    read_data(&id, 4);
    u64 ram;
    sel(0x0003);
    read_data(&ram, 8);
    u16 cpus;
    sel(0x0005);
    read_data(&cpus, 2);
    printf("fw_cfg id=%u ram=0x%lx cpus=%u\n", id, ram, cpus);

    u32 count;
    sel(0x0019);
    read_data(&count, 4);
    count = bswap32(count);
    printf("fw_cfg files=%u\n", count);
    const char *want = "opt/pyvmm/test";
    u16 want_key = 0, e820_key = 0;
    u32 want_size = 0, e820_size = 0;
    for (u32 i = 0; i < count && i < 64; i++) {
        struct { u32 size; u16 select; u16 reserved; char name[56]; } f;
        read_data(&f, sizeof f);
        f.name[55] = 0;
        u32 size = bswap32(f.size);
        u16 key = (u16)((f.select >> 8) | (f.select << 8));
        printf("fw_cfg file %s size=%u key=0x%x\n", f.name, size, key);
        if (streq(f.name, want)) {
            want_key = key;
            want_size = size;
        }
        if (streq(f.name, "etc/e820")) {
            e820_key = key;
            e820_size = size;
        }
    }
    if (e820_key) {
        sel(e820_key);
        for (u32 i = 0; i + 20 <= e820_size && i < 20 * 16; i += 20) {
            struct { u64 addr; u64 len; u32 type; } __attribute__((packed)) e;
            read_data(&e, 20);
            printf("fw_cfg e820 0x%lx+0x%lx type=%u\n", e.addr, e.len, e.type);
        }
    }
    if (!want_key) {
        printf("FAIL: no %s\n", want);
        return 4;
    }
    char by_port[128] = {0};
    u32 n = want_size < sizeof by_port - 1 ? want_size : sizeof by_port - 1;
    sel(want_key);
    read_data(by_port, n);
    printf("fw_cfg data %s\n", by_port);
    u32 ctl = 0;
    if (id & 2) {
        memset(dma_buf, 0xff, sizeof dma_buf);
        ctl = dma_read(want_key, dma_buf, n + 4); /* 4 past the end: zeros */
        dma_buf[n + 4] = 0;
        printf("fw_cfg dma control=%u %s tail=%u%u%u%u\n", ctl, (char *)dma_buf,
               dma_buf[n], dma_buf[n + 1], dma_buf[n + 2], dma_buf[n + 3]);
        /* DMA to a guest address outside RAM: the device reports an error */
        u32 bad = dma_read(want_key, (void *)(1ul << 40), 16);
        printf("fw_cfg dma outside-ram control=%u\n", bad);
        if (memcmp(dma_buf, by_port, n) || dma_buf[n] || ctl || !(bad & 1)) {
            printf("FAIL: dma\n");
            return 5;
        }
    }
    printf("fw_cfg ok\n");
    return 0;
}
