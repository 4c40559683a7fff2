"""engine/loader"""
