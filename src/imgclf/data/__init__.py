"""The datasets `data.dataset` names, fetched by the download stage and read back by prepare.

types        DataError, RawData and the archive suffixes: the leaf every other module imports
datasets     which dataset is which: digits, CIFAR-10/100, image folders; fetch and read
cifar        the official CIFAR archives, checksummed with torchvision's constants
archives     tar and zip archives: reproducible packing, listing, one pass over the bytes
imagefolder  train/<class>/<image> layouts: splits and classes from paths, parallel decoding
"""
