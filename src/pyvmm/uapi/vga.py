"""VGA register ports and indices (IBM VGA Technical Reference) and the Bochs VBE
"DISPI" interface (Bochs' vbe.h, QEMU's include/hw/display/bochs-vbe.h and
docs/specs/standard-vga.rst)."""

# --- VGA ports ---------------------------------------------------------------------------
VGA_PORT_BASE, VGA_PORT_COUNT = 0x3B0, 0x30  # 0x3B0-0x3DF: mono and colour decodes
VGA_ATT_W = 0x3C0  # attribute controller: index / data write (flip-flop)
VGA_ATT_R = 0x3C1  # attribute controller: data read
VGA_MIS_W = 0x3C2  # miscellaneous output, write
VGA_IS0_R = 0x3C2  # input status 0, read
VGA_SEQ_I, VGA_SEQ_D = 0x3C4, 0x3C5
VGA_PEL_MSK = 0x3C6
VGA_PEL_IR = 0x3C7  # DAC read index (write); DAC state (read)
VGA_PEL_IW = 0x3C8  # DAC write index
VGA_PEL_D = 0x3C9
VGA_FTC_R = 0x3CA  # feature control, read
VGA_MIS_R = 0x3CC  # miscellaneous output, read
VGA_GFX_I, VGA_GFX_D = 0x3CE, 0x3CF
VGA_CRT_IC, VGA_CRT_DC = 0x3D4, 0x3D5  # colour CRTC (misc output bit 0 set)
VGA_CRT_IM, VGA_CRT_DM = 0x3B4, 0x3B5  # mono CRTC (bit 0 clear)
VGA_IS1_RC, VGA_IS1_RM = 0x3DA, 0x3BA  # input status 1 (reading resets the flip-flop)
VGA_FTC_WC, VGA_FTC_WM = 0x3DA, 0x3BA  # feature control, write

VGA_MIS_COLOR = 0x01  # I/O address select: CRTC at 0x3Dx

VGA_IS1_DE = 0x01  # display enable (not): in a blanking interval
VGA_IS1_VR = 0x08  # vertical retrace

# CRTC registers
VGA_CRTC_H_DISP = 0x01
VGA_CRTC_OVERFLOW = 0x07
VGA_CRTC_MAX_SCAN = 0x09
VGA_CRTC_CURSOR_START = 0x0A
VGA_CRTC_CURSOR_END = 0x0B
VGA_CRTC_START_HI = 0x0C
VGA_CRTC_START_LO = 0x0D
VGA_CRTC_CURSOR_HI = 0x0E
VGA_CRTC_CURSOR_LO = 0x0F
VGA_CRTC_V_SYNC_END = 0x11  # bit 7: protect registers 0-7
VGA_CRTC_V_DISP_END = 0x12
VGA_CRTC_OFFSET = 0x13
VGA_CRTC_REGS = 0x19
VGA_CR0A_CURSOR_OFF = 0x20

VGA_SEQ_REGS = 5
VGA_SEQ_MEMORY_MODE = 0x04
VGA_GFX_REGS = 9
VGA_GFX_MISC = 0x06  # bit 0 graphics mode, bits 2-3 memory map select
VGA_ATT_REGS = 0x15
VGA_ATT_MODE = 0x10
VGA_ATT_PAS = 0x20  # palette address source: set = display enabled

VGA_WINDOW_BASE, VGA_WINDOW_SIZE = 0xA0000, 0x20000

# --- Bochs VBE DISPI --------------------------------------------------------------------
VBE_DISPI_IOPORT_INDEX = 0x1CE
VBE_DISPI_IOPORT_DATA = 0x1CF

VBE_DISPI_INDEX_ID = 0x0
VBE_DISPI_INDEX_XRES = 0x1
VBE_DISPI_INDEX_YRES = 0x2
VBE_DISPI_INDEX_BPP = 0x3
VBE_DISPI_INDEX_ENABLE = 0x4
VBE_DISPI_INDEX_BANK = 0x5
VBE_DISPI_INDEX_VIRT_WIDTH = 0x6
VBE_DISPI_INDEX_VIRT_HEIGHT = 0x7
VBE_DISPI_INDEX_X_OFFSET = 0x8
VBE_DISPI_INDEX_Y_OFFSET = 0x9
VBE_DISPI_INDEX_VIDEO_MEMORY_64K = 0xA
VBE_DISPI_INDEX_NB = 0xB

VBE_DISPI_ID0 = 0xB0C0
VBE_DISPI_ID5 = 0xB0C5

VBE_DISPI_MAX_XRES = 16000  # QEMU's limits (Bochs': 2560x1600)
VBE_DISPI_MAX_YRES = 12000
VBE_DISPI_MAX_BPP = 32

VBE_DISPI_DISABLED = 0x00
VBE_DISPI_ENABLED = 0x01
VBE_DISPI_GETCAPS = 0x02
VBE_DISPI_8BIT_DAC = 0x20
VBE_DISPI_LFB_ENABLED = 0x40
VBE_DISPI_NOCLEARMEM = 0x80

# --- QEMU's std-VGA PCI function (docs/specs/standard-vga.rst) ----------------------------
PCI_VENDOR_ID_QEMU = 0x1234
PCI_DEVICE_ID_QEMU_VGA = 0x1111
PCI_CLASS_DISPLAY_VGA = 0x030000
STDVGA_MMIO_SIZE = 0x1000
STDVGA_MMIO_EDID = 0x000  # 0x000-0x3ff: EDID blob
STDVGA_MMIO_VGA = 0x400  # 0x400-0x41f: VGA ports 0x3c0-0x3df, byte access
STDVGA_MMIO_DISPI = 0x500  # 0x500-0x515: DISPI registers, 16 bit, index * 2
STDVGA_MMIO_QEXT = 0x600  # 0x600-0x607: QEMU extended registers
QEXT_SIZE, QEXT_BYTEORDER = 0x0, 0x4
QEXT_LITTLE_ENDIAN = 0x1E1E1E1E
