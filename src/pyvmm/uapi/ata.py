"""ATA names from the ATA/ATAPI-8 command set (ATA8-ACS) and parallel transport
(ATA8-APT), spelled as Linux ``include/linux/ata.h`` spells them, and the PIIX3/PIIX4
bus-master IDE registers named as in the Intel 82371SB/AB datasheets."""

# --- Command Block registers (offsets from 0x1F0 / 0x170) ------------------------------
ATA_REG_DATA = 0
ATA_REG_ERR = 1  # read: Error
ATA_REG_FEATURE = 1  # write: Features
ATA_REG_NSECT = 2  # Count (Sector Count)
ATA_REG_LBAL = 3  # LBA Low (Sector Number)
ATA_REG_LBAM = 4  # LBA Mid (Cylinder Low)
ATA_REG_LBAH = 5  # LBA High (Cylinder High)
ATA_REG_DEVICE = 6  # Device (Device/Head)
ATA_REG_STATUS = 7  # read: Status
ATA_REG_CMD = 7  # write: Command

# --- Status register -------------------------------------------------------------------
ATA_BUSY = 1 << 7  # BSY
ATA_DRDY = 1 << 6  # device ready
ATA_DF = 1 << 5  # device fault
ATA_DRQ = 1 << 3  # data request
ATA_ERR = 1 << 0

# --- Error register --------------------------------------------------------------------
ATA_ICRC = 1 << 7
ATA_UNC = 1 << 6  # uncorrectable data
ATA_IDNF = 1 << 4  # ID not found (address out of range)
ATA_ABORTED = 1 << 2  # ABRT

# --- Device register ---------------------------------------------------------------------
ATA_LBA = 1 << 6
ATA_DEV1 = 1 << 4

# --- Device Control register (0x3F6 / 0x376, write) ---------------------------------------
ATA_NIEN = 1 << 1  # interrupt disable
ATA_SRST = 1 << 2  # software reset
ATA_HOB = 1 << 7  # read the high-order bytes of the 48-bit registers

# --- Commands (ATA8-ACS) -----------------------------------------------------------------
ATA_CMD_DEV_RESET = 0x08  # PACKET feature set only
ATA_CMD_READ_PIO = 0x20  # READ SECTORS
ATA_CMD_READ_PIO_EXT = 0x24
ATA_CMD_READ_DMA_EXT = 0x25
ATA_CMD_READ_MULTI_EXT = 0x29
ATA_CMD_WRITE_PIO = 0x30  # WRITE SECTORS
ATA_CMD_WRITE_PIO_EXT = 0x34
ATA_CMD_WRITE_DMA_EXT = 0x35
ATA_CMD_WRITE_MULTI_EXT = 0x39
ATA_CMD_EDD = 0x90  # EXECUTE DEVICE DIAGNOSTIC
ATA_CMD_READ_MULTI = 0xC4
ATA_CMD_WRITE_MULTI = 0xC5
ATA_CMD_SET_MULTI = 0xC6
ATA_CMD_READ = 0xC8  # READ DMA
ATA_CMD_WRITE = 0xCA  # WRITE DMA
ATA_CMD_STANDBYNOW1 = 0xE0  # STANDBY IMMEDIATE
ATA_CMD_IDLEIMMEDIATE = 0xE1
ATA_CMD_STANDBY = 0xE2
ATA_CMD_IDLE = 0xE3
ATA_CMD_CHK_POWER = 0xE5  # CHECK POWER MODE
ATA_CMD_FLUSH = 0xE7
ATA_CMD_FLUSH_EXT = 0xEA
ATA_CMD_ID_ATA = 0xEC  # IDENTIFY DEVICE
ATA_CMD_SET_FEATURES = 0xEF

# SET FEATURES subcommands (Features register)
SETFEATURES_WC_ON = 0x02
SETFEATURES_XFER = 0x03
SETFEATURES_WC_OFF = 0x82
SETFEATURES_REVERT_OFF = 0x66  # disable reverting to power-on defaults (at a reset)
SETFEATURES_REVERT_ON = 0xCC

# SET FEATURES / set transfer mode values (Count register)
XFER_PIO_DEFAULT = 0x00
XFER_PIO_DEFAULT_NO_IORDY = 0x01
XFER_PIO_0 = 0x08  # PIO flow-control mode n: 0x08 | n
XFER_MW_DMA_0 = 0x20  # multiword DMA mode n: 0x20 | n
XFER_UDMA_0 = 0x40  # Ultra DMA mode n: 0x40 | n

# CHECK POWER MODE results (Count register)
ATA_POWER_STANDBY = 0x00
ATA_POWER_ACTIVE_OR_IDLE = 0xFF

# EXECUTE DEVICE DIAGNOSTIC / reset: diagnostic code in the Error register
ATA_DIAG_PASSED = 0x01

ATA_SECT_SIZE = 512
ATA_ID_WORDS = 256

# --- Legacy (ISA compatibility) resources ---------------------------------------------------
ATA_PRIMARY_CMD, ATA_PRIMARY_CTL, ATA_PRIMARY_IRQ = 0x1F0, 0x3F6, 14
ATA_SECONDARY_CMD, ATA_SECONDARY_CTL, ATA_SECONDARY_IRQ = 0x170, 0x376, 15

# --- PIIX3/PIIX4 IDE function (82371SB/AB datasheets) ----------------------------------------
PCI_VENDOR_ID_INTEL = 0x8086
PCI_DEVICE_ID_INTEL_82371SB_1 = 0x7010  # PIIX3 IDE
PIIX_IDE_CLASS = 0x010180  # mass storage, IDE, ISA compatibility mode + bus master
# Programming interface (PCI IDE Controller Specification 1.0, 2.1): bit 0 primary and
# bit 2 secondary in native-PCI mode (their blocks in BAR0/1 and BAR2/3, the function's
# INTx), bits 1 and 3 "mode programmable" (clear: fixed), bit 7 bus master.
PCI_IDE_PROGIF_PRI_NATIVE = 1 << 0
PCI_IDE_PROGIF_SEC_NATIVE = 1 << 2
PCI_IDE_CMD_BAR_SIZE = 8  # BAR0 / BAR2: the Command Block
PCI_IDE_CTL_BAR_SIZE = 4  # BAR1 / BAR3: Alternate Status/Device Control at offset 2
PCI_IDE_CTL_OFFSET = 2
PIIX_IDETIM_PRI = 0x40  # IDE timing, primary (16 bits)
PIIX_IDETIM_SEC = 0x42  # IDE timing, secondary
PIIX_SIDETIM = 0x44  # slave IDE timing
PIIX_IDETIM_IDE = 1 << 15  # IDE decode enable (the legacy ports of that channel)
PIIX_IDETIM_WMASK = 0xF3FF  # bits 11:10 reserved
PIIX_BMIBA_BAR = 4  # BMIBA, config 0x20: bus-master IDE base address (16 bytes of I/O)
PIIX_BM_SIZE = 16

# Bus-master registers, per channel at BMIBA + 8 * channel
BMICX = 0  # bus-master IDE command
BMISX = 2  # bus-master IDE status
BMIDTPX = 4  # descriptor table pointer (32 bits)
BMICX_SSBM = 1 << 0  # start/stop bus master
BMICX_RWCON = 1 << 3  # 1: the bus master writes memory (a device-to-host transfer)
BMISX_BMIDEA = 1 << 0  # bus master IDE active
BMISX_IDEDMA_ERR = 1 << 1  # a transfer to or from memory failed (write 1 to clear)
BMISX_IDEINTS = 1 << 2  # the channel's IDE interrupt was asserted (write 1 to clear)
BMISX_DMA0CAP = 1 << 5  # drive 0 DMA capable (software-set)
BMISX_DMA1CAP = 1 << 6  # drive 1 DMA capable (software-set)

# Physical Region Descriptor: u32 memory address, u16 byte count, u16 flags
PRD_EOT = 1 << 15  # in the flags word: the table's last entry
PRD_MAX_BYTES = 0x10000  # a byte count of 0 means 64 KiB
PRD_TABLE_MAX_ENTRIES = 8192  # a table may not cross a 64 KiB boundary: 64 KiB / 8
