"""QEMU's firmware configuration interface (Linux UAPI <linux/qemu_fw_cfg.h>, QEMU's
docs/specs/fw_cfg.rst); x86 port layout as QEMU's pc machines place it."""

FW_CFG_ACPI_DEVICE_ID = "QEMU0002"

# selector keys of the well-known items
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_MACHINE_ID = 0x06
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_INVALID = 0xFFFF

# FW_CFG_ID bits
FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02

# FWCfgDmaAccess.control bits
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10

FW_CFG_MAX_FILE_PATH = 56
FW_CFG_DMA_SIGNATURE = 0x51454D5520434647  # "QEMU CFG", read from the DMA register

# x86: selector (16-bit) at 0x510, data (8-bit) at 0x511, DMA address (64-bit, big
# endian; writing its low half starts a transfer) at 0x514
FW_CFG_IO_BASE = 0x510
FW_CFG_IO_SIZE = 2
FW_CFG_DMA_IO_BASE = 0x514
FW_CFG_DMA_IO_SIZE = 8
