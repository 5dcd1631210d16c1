"""igrpn: landmark detection in 3D fetal facial ultrasound with a 3D region proposal network,
an IoU-balanced classification loss and a distance-based graph prior (Chen et al., ISBI 2020).
"""

__version__ = "0.1.0"
