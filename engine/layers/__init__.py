"""engine/layers"""
